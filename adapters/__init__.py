"""peftkit's adapters, one file per method (shipped as ``peftkit.adapters``).

Every module here is imported by ``peftkit.registry.discover()``; a new file is found without editing any
list. Files whose names start with an underscore are skipped.
"""
