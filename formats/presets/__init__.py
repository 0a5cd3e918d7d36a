"""Config presets shipped as package data (`--config tiny`, `--config sd3`)."""
