//! Helpers for integration tests that mount real kcache filesystems.
