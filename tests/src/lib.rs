//! Test harness for clusters of hostd processes.
