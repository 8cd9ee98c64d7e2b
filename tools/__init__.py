"""Developer tooling of the repository (HTML export, code-line counts): not part of the `dslib` package."""
