"""
The quarantine for third-party library internals. Anything in pushd that reaches into a
dependency's private or undocumented attributes (for speed, or for a hook the library does
not offer) lives here, one small module per library, each pinned to a version range in
setup.cfg and with a ``self_check()`` that a test runs: an incompatible release fails that
test, not a production gateway.
"""
