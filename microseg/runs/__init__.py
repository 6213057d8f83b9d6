"""A run: its folder (file names, --force / --resume, the lock), its configuration, the inputs it
names (resolved once) and the papers' recipes, its checkpoint and the one loader of its model, and
the record reports read of it. Imports data/, models/, losses/, metrics/ and core/ (the layers below it)."""
