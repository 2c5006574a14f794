"""Run by the web UI at every launch: installs only what is missing (filled in by the extension issue)."""
