//! The end-to-end tests, in one test binary: the real daemon (`magento-token-sidecar`, a child
//! process) against the dev server (in this process) on loopback, one module per subject. One
//! binary instead of one per file: each of 16 binaries compiled the harness (`common`) again and
//! linked the library and every dependency again.
//!
//! The tests of every module share this process, on parallel threads. What one changes for the
//! whole process is seen by all the others: a test starts children with their own environment
//! and working directory (`Command::env`, `current_dir`), never `std::env::set_var` or
//! `set_current_dir`; a port is taken from the system (`common::free_port`), never fixed; a
//! process-wide change must be one every test can live with (`hardening_admin` raises the
//! soft open-file limit to the hard one). A test that cannot share a process gets a binary of
//! its own, saying why (`tests/zeroize.rs`: its global allocator).
//!
//! The stand-in Kubernetes API (`kubeapi`) and the tests that use it exist with the `kubernetes`
//! feature (a default one) only.

mod common;
mod daemon;
mod faults;
mod formats;
mod graphql;
mod hardening_admin;
mod hardening_answers;
mod hardening_files;
mod hardening_ledger;
mod issuer;
#[cfg(feature = "kubernetes")]
mod kubeapi;
#[cfg(feature = "kubernetes")]
mod kubeapi_standin;
mod lockout;
mod notify;
mod ownership;
mod perf;
mod real_stores;
mod robust;
#[cfg(feature = "kubernetes")]
mod scale_out;
mod security;
#[cfg(feature = "kubernetes")]
mod token_api;
