"""The micro-US dataset: its layout, NIfTI volumes, the phantom simulator, the dataset check, its
download, `prepare` and the HDF5 slice cache it writes, the torch dataset, the augmentation and the
epoch order. Imports losses/, metrics/ and core/ (the layers below); models/ is independent of it."""
