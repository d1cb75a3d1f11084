"""The pipeline stages, one public entry each; stages never import each other (only `pipeline` composes them)."""
