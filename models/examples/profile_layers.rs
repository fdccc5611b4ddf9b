//! Times each layer of the activity CNN's forward pass on flex, at batch 1 and 32, to find
//! an op that does not scale (docs/benchmarks.md). Layers are built with the committed
//! bundle's shapes (6 channels × 100 samples, hidden 16, kernel 5); weights are random,
//! which does not change the cost.
//!
//! ```text
//! cargo run --release -p ember-models --no-default-features --example profile_layers
//! ```

use std::time::Instant;

use burn::nn::PaddingConfig1d;
use burn::nn::conv::Conv1dConfig;
use burn::nn::pool::{AdaptiveAvgPool1dConfig, MaxPool1dConfig};
use burn::prelude::*;

fn time<O>(name: &str, batch: usize, iters: usize, mut f: impl FnMut() -> O) {
    for _ in 0..iters / 10 {
        std::hint::black_box(f());
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        std::hint::black_box(f());
        samples.push(t.elapsed().as_nanos() as f64 / 1e3);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "batch {batch:>3}  {name:<34} p50 {:>9.1} µs",
        samples[samples.len() / 2]
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex();
    for name in ["activity-f32", "anomaly-f32"] {
        let path = format!("{}/bundles/{name}.bundle", env!("CARGO_MANIFEST_DIR"));
        let bundle = ember_models::Bundle::read(&std::fs::read(&path)?)?;
        let model = ember_models::LoadedModel::load(&bundle, &device)?;
        for batch in [1usize, 32] {
            // The benchmark's input (bench/inference): the golden windows, cycled.
            let golden = &bundle.manifest().golden.vectors;
            let input: Vec<f32> = (0..batch)
                .flat_map(|i| golden[i % golden.len()].input.iter().copied())
                .collect();
            model.infer(&input)?; // fails loudly here rather than silently in the loop
            let iters = if batch == 1 { 2000 } else { 200 };
            time(&format!("{name} LoadedModel::infer"), batch, iters, || {
                model.infer(&input)
            });
        }
    }
    let (channels, window, hidden, k) = (6, 100, 16, 5);
    let conv = |i: usize, o: usize| {
        Conv1dConfig::new(i, o, k)
            .with_padding(PaddingConfig1d::Same)
            .init(&device)
    };
    let (conv1, conv2, conv3) = (
        conv(channels, hidden),
        conv(hidden, 2 * hidden),
        conv(2 * hidden, 2 * hidden),
    );
    let pool = MaxPool1dConfig::new(2).init();
    let gap = AdaptiveAvgPool1dConfig::new(1).init();
    for batch in [1usize, 32] {
        let iters = if batch == 1 { 2000 } else { 200 };
        let x = Tensor::<3>::random(
            [batch, channels, window],
            burn::tensor::Distribution::Default,
            &device,
        );
        let sync = |t: Tensor<3>| t.into_data();
        time("conv1", batch, iters, || sync(conv1.forward(x.clone())));
        let a = conv1.forward(x.clone());
        time("maxpool (after conv1)", batch, iters, || {
            sync(pool.forward(a.clone()))
        });
        let a = pool.forward(a);
        time("conv2", batch, iters, || sync(conv2.forward(a.clone())));
        let b = conv2.forward(a.clone());
        time("maxpool (after conv2)", batch, iters, || {
            sync(pool.forward(b.clone()))
        });
        let b = pool.forward(b);
        time("conv3", batch, iters, || sync(conv3.forward(b.clone())));
        let c = conv3.forward(b.clone());
        time("adaptive avg pool -> 1", batch, iters, || {
            sync(gap.forward(c.clone()))
        });
        time("mean_dim(2)", batch, iters, || sync(c.clone().mean_dim(2)));
        let [n, ch, l] = b.dims();
        let bb = conv2.forward(a.clone());
        time("maxpool via reshape+max_dim", batch, iters, || {
            sync(
                bb.clone()
                    .reshape([n, ch, l, 2])
                    .max_dim(3)
                    .reshape([n, ch, l]),
            )
        });
    }
    Ok(())
}
