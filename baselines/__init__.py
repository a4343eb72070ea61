"""Built-in DFML methods. Each registers under the ``dfml_bench.methods`` entry-point group in
pyproject.toml, exactly like a third-party plugin would."""
