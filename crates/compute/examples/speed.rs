use pstrain_compute::{ModelKind, ModelOptions};
use pstrain_core::Rng;
use std::time::Instant;
fn main() {
    for kind in ModelKind::ALL {
        let mut m = kind.build(ModelOptions::default());
        let mut rng = Rng::new(1);
        let mut p = vec![0.0; m.layout().len()];
        m.init_params(&mut p, &mut rng);
        let mut g = vec![0.0; p.len()];
        let imgs: Vec<f32> = (0..64 * 784).map(|_| rng.uniform(-0.4, 2.8)).collect();
        let labels: Vec<u8> = (0..64).map(|i| (i % 10) as u8).collect();
        for _ in 0..3 { m.train_step(&p, &imgs, &labels, &mut g, &mut rng).unwrap(); }
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < 3.0 { m.train_step(&p, &imgs, &labels, &mut g, &mut rng).unwrap(); n += 64; }
        println!("{kind}: {:.0} samples/s", n as f64 / t.elapsed().as_secs_f64());
    }
}
