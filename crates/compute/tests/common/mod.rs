//! The JAX reference check shared by the test binaries: a model's loss and gradient on a
//! fixed tiny input against values computed in float64 by an independent implementation.

use pstrain_compute::{ModelKind, ModelOptions};
use pstrain_core::Rng;
use serde_json::Value;

/// The fixture: its labels, and per model the loss and summaries of the gradient.
pub fn fixture() -> Value {
    serde_json::from_str(include_str!("../fixtures/reference_grads.json"))
        .expect("fixture is valid JSON")
}

/// The same closed-form images as the fixture script's `pixel`.
pub fn images_for(n: usize) -> Vec<f32> {
    (0..n * 784)
        .map(|j| (1.5 * (0.113 * j as f64).cos() + 0.2) as f32)
        .collect()
}

/// `kind`'s loss and gradient at the fixture's weights, without dropout.
pub fn gradient(
    kind: ModelKind,
    threads: usize,
    images: &[f32],
    labels: &[u8],
) -> (Box<dyn pstrain_compute::Model>, f32, Vec<f32>) {
    let mut model = kind.build(ModelOptions {
        dropout: false,
        threads,
    });
    let params = params_for(model.layout());
    let mut grads = vec![0.0; params.len()];
    let stats = model
        .train_step(&params, images, labels, &mut grads, &mut Rng::new(0))
        .unwrap();
    (model, stats.loss, grads)
}

/// The same closed-form weights as the fixture script's `value`.
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

/// Asserts that `kind` on `threads` threads matches the fixture.
pub fn check(kind: ModelKind, threads: usize) {
    let fixture = fixture();
    let labels: Vec<u8> = fixture["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    let images = images_for(labels.len());
    let reference = &fixture["models"][kind.name()];

    let (model, loss, grads) = gradient(kind, threads, &images, &labels);
    let ref_loss = reference["loss"].as_f64().unwrap();
    assert!(
        (f64::from(loss) - ref_loss).abs() < 1e-5 * ref_loss.abs().max(1.0),
        "{kind}: loss {loss} vs reference {ref_loss}"
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
