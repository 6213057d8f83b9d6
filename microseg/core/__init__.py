"""Foundations every layer uses: the error type, atomic writes, tables, the device and its processes
(runtime), Ctrl-C / SIGTERM / SIGHUP (stop), torch files read safely, option rules, the
preprocessing record, patient statistics, patients in parallel worker processes, resumable HTTP
fetches, the one YAML reader. The lowest layer: imports nothing of microseg outside core/."""
