//! Whole-model loss and gradient against values computed by an independent implementation
//! (JAX, float64; `tools/reference/make_fixture.py` wrote the fixture) on a fixed tiny input.

mod common;

use common::check;
use pstrain_compute::ModelKind;

#[test]
fn cnn_matches_the_jax_reference() {
    check(ModelKind::Cnn, 1);
}

#[test]
fn convnet_matches_the_jax_reference() {
    check(ModelKind::Convnet, 1);
}

#[test]
fn models_on_several_threads_match_the_jax_reference() {
    for kind in ModelKind::ALL {
        for threads in [2, 3] {
            check(kind, threads);
        }
    }
}
