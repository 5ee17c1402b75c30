"""Site ingestion: read a hospital's drop, validate, quarantine, de-identify and harmonize it."""
