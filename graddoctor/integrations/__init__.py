"""Callbacks for the frameworks people train with: `graddoctor.integrations.lightning` and
`graddoctor.integrations.transformers`. Each imports its framework only when imported itself."""
