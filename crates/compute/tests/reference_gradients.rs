//! Whole-model loss and gradient against values computed by an independent implementation
//! (JAX, float64; `tools/reference/make_fixture.py` wrote the fixture) on a fixed tiny input.

use pstrain_compute::{ModelKind, ModelOptions};
use pstrain_core::Rng;
use serde_json::Value;

/// The same closed-form inputs as the fixture script's `value` and `pixel`.
fn params_for(layout: &pstrain_core::Layout) -> Vec<f32> {
    let mut out = Vec::with_capacity(layout.len());
    let mut fan_in = 1usize;
    for (t, spec) in layout.tensors().iter().enumerate() {
        if spec.name.ends_with(".weight") {
            fan_in = spec.shape[1..].iter().product();
        }
        for i in 0..spec.len() {
            let v = (0.731 * i as f64 + 0.3 * t as f64 + 0.1).sin() / (fan_in as f64).sqrt();
            out.push(v as f32);
        }
    }
    out
}

fn check(kind: ModelKind, threads: usize) {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/reference_grads.json"))
        .expect("fixture is valid JSON");
    let labels: Vec<u8> = fixture["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    let images: Vec<f32> = (0..labels.len() * 784)
        .map(|j| (1.5 * (0.113 * j as f64).cos() + 0.2) as f32)
        .collect();
    let reference = &fixture["models"][kind.name()];

    let mut model = kind.build(ModelOptions {
        dropout: false,
        threads,
    });
    let params = params_for(model.layout());
    let mut grads = vec![0.0; params.len()];
    let stats = model
        .train_step(&params, &images, &labels, &mut grads, &mut Rng::new(0))
        .unwrap();
    let ref_loss = reference["loss"].as_f64().unwrap();
    assert!(
        (f64::from(stats.loss) - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0),
        "{kind}: loss {} vs reference {ref_loss}",
        stats.loss
    );

    for spec in model.layout().tensors() {
        let r = &reference["tensors"][spec.name.as_str()];
        let g = &grads[spec.range()];
        let ref_abs = r["abs_sum"].as_f64().unwrap();
        let abs: f64 = g.iter().map(|&v| f64::from(v).abs()).sum();
        let sum: f64 = g.iter().map(|&v| f64::from(v)).sum();
        // Scale of one element, to judge absolute errors of values near zero.
        let scale = ref_abs / g.len() as f64;
        assert!(
            (abs - ref_abs).abs() <= 1e-4 * ref_abs,
            "{kind} {}: |grad| sum {abs} vs {ref_abs}",
            spec.name
        );
        let ref_sum = r["sum"].as_f64().unwrap();
        assert!(
            (sum - ref_sum).abs() <= 1e-4 * ref_abs,
            "{kind} {}: grad sum {sum} vs {ref_sum}",
            spec.name
        );
        let indices = r["indices"].as_array().unwrap();
        let values = r["values"].as_array().unwrap();
        for (i, v) in indices.iter().zip(values) {
            let (i, v) = (i.as_u64().unwrap() as usize, v.as_f64().unwrap());
            let got = f64::from(g[i]);
            assert!(
                (got - v).abs() <= 1e-4 * v.abs() + 1e-3 * scale,
                "{kind} {}[{i}]: {got} vs reference {v}",
                spec.name
            );
        }
    }
}

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
