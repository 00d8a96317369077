"""Ready-to-run agent definitions shipped with callbrain."""
