"""The seven parity checks, one module each; each returns a :class:`parity.results.StageResult`."""
