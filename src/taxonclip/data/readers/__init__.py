"""One reader per dataset format behind one interface (`base.Reader`), listed in `registry`.

Adding a format is one module here that defines `READER` and one line in `registry.READERS`.
"""
