//! Getting a guest started: system tables and entry state, and kernel images.

pub mod kernel;
pub mod tables;
