"""Service shell: config, CLI, daemon lifecycle, metrics, web viewer."""
