//! Times the models' forward passes and their parts on flex, at batch 1 and 32, with
//! alternatives of the same math interleaved in one process (so a loaded machine slows them
//! alike and the ratios stay comparable; docs/benchmarks.md). Uses the committed bundles
//! (activity: 6 channels × 100 samples, hidden 16, kernel 5; anomaly: 6 × 100, hidden 16,
//! latent 4) and, for single layers, random weights of the same shapes.
//!
//! ```text
//! cargo run --release -p ember-models --no-default-features --example profile_layers
//! ```

use std::time::Instant;

use burn::nn::PaddingConfig1d;
use burn::nn::conv::{Conv1dConfig, ConvTranspose1dConfig};
use burn::prelude::*;
use ember_models::model::Net;

type Case<'a> = (&'static str, Box<dyn FnMut() + 'a>);

/// Runs the cases round-robin, `rounds` blocks of `iters / rounds` calls each, after a
/// warm-up; prints each case's p50 over all calls, the range of its per-round p50s, and its
/// p50 relative to the first case.
fn interleaved(title: &str, batch: usize, iters: usize, mut cases: Vec<Case<'_>>) {
    const ROUNDS: usize = 10;
    let per_round = (iters / ROUNDS).max(1);
    for (_, f) in cases.iter_mut() {
        for _ in 0..per_round {
            f();
        }
    }
    let mut samples = vec![Vec::with_capacity(iters); cases.len()];
    let mut round_p50 = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            let mut round = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                let t = Instant::now();
                f();
                round.push(t.elapsed().as_nanos() as f64 / 1e3);
            }
            round.sort_by(f64::total_cmp);
            round_p50[i].push(round[round.len() / 2]);
            samples[i].extend(round);
        }
    }
    let p50 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = p50(&mut samples[0]);
    println!("-- {title}, batch {batch}");
    for (i, (name, _)) in cases.iter().enumerate() {
        let p = p50(&mut samples[i]);
        let r = &mut round_p50[i];
        r.sort_by(f64::total_cmp);
        println!(
            "batch {batch:>3}  {name:<40} p50 {p:>8.1} µs  rounds {:>7.1}–{:<7.1}  × {:.2}",
            r[0],
            r[r.len() - 1],
            p / base
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex();
    for name in ["activity-f32", "anomaly-f32"] {
        let path = format!("{}/bundles/{name}.bundle", env!("CARGO_MANIFEST_DIR"));
        let bundle = ember_models::Bundle::read(&std::fs::read(&path)?)?;
        let model = ember_models::LoadedModel::load(&bundle, &device)?;
        let net = model.net();
        let (channels, window) = (model.input().channels, model.input().window);
        let plan = ember_models::plan::Plan::new(net, channels, window)
            .expect("committed bundles have a plan");
        // The other rows get the input as it is: the plan normalizes with the identity.
        let identity = ember_models::manifest::Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        };
        for batch in [1usize, 32] {
            // The benchmark's input (bench/inference): the golden windows, cycled.
            let golden = &bundle.manifest().golden.vectors;
            let input: Vec<f32> = (0..batch)
                .flat_map(|i| golden[i % golden.len()].input.iter().copied())
                .collect();
            model.infer(&input)?; // fails loudly here rather than silently in the loop
            let x = Tensor::<3>::from_data(
                TensorData::new(input.clone(), [batch, channels, window]),
                &device,
            );
            let iters = if batch == 1 { 4000 } else { 400 };
            // Old (module) forward vs the rewritten forward, the output head included, and
            // what `infer` adds around the latter (checks, normalization, tensor in and out).
            let old = || match net {
                Net::Activity(m) => {
                    burn::tensor::activation::softmax(m.forward_modules(x.clone()), 1).into_data()
                }
                Net::Anomaly(m) => {
                    let recon = m.forward_modules(x.clone());
                    let err: Tensor<2> = (recon - x.clone()).square().flatten(1, 2);
                    err.mean_dim(1).into_data()
                }
            };
            interleaved(
                name,
                batch,
                iters,
                vec![
                    ("module forward (before)", Box::new(|| drop(old()))),
                    (
                        "Net::outputs (rewritten forward)",
                        Box::new(|| drop(net.outputs(x.clone()).into_data())),
                    ),
                    (
                        "Plan::run_into (host buffers, no allocation)",
                        Box::new(|| {
                            let mut out = Vec::with_capacity(batch * 4);
                            plan.run_into(&input, &identity, &mut out);
                            drop(out)
                        }),
                    ),
                    ("LoadedModel::infer", Box::new(|| drop(model.infer(&input)))),
                    (
                        "softmax [batch, 4] only",
                        Box::new(|| {
                            let t = Tensor::<2>::zeros([batch, 4], &device);
                            drop(burn::tensor::activation::softmax(t, 1).into_data())
                        }),
                    ),
                    (
                        "tensor from data + into_data only",
                        Box::new(|| {
                            let t = Tensor::<3>::from_data(
                                TensorData::new(input.clone(), [batch, channels, window]),
                                &device,
                            );
                            drop(t.into_data())
                        }),
                    ),
                ],
            );
        }
    }

    // Single layers of the activity CNN: flex's conv kernel vs the time-major matrix product.
    let (channels, window, hidden, k) = (6, 100, 16, 5);
    let conv = |i: usize, o: usize| {
        Conv1dConfig::new(i, o, k)
            .with_padding(PaddingConfig1d::Same)
            .init(&device)
    };
    let layers = [
        ("conv1 6→16 × 100", conv(channels, hidden), window),
        ("conv2 16→32 × 50", conv(hidden, 2 * hidden), window / 2),
        ("conv3 32→32 × 25", conv(2 * hidden, 2 * hidden), window / 4),
    ];
    for batch in [1usize, 32] {
        let iters = if batch == 1 { 4000 } else { 400 };
        for (title, conv, length) in &layers {
            let [_, c_in, _] = conv.weight.dims();
            let x = Tensor::<3>::random(
                [batch, c_in, *length],
                burn::tensor::Distribution::Default,
                &device,
            );
            let x_nlc = x.clone().swap_dims(1, 2).into_data();
            let x_nlc = Tensor::<3>::from_data(x_nlc, &device);
            let [c_out, _, _] = conv.weight.dims();
            let w_ck: Tensor<3> = conv
                .weight
                .val()
                .swap_dims(1, 2)
                .reshape([1, c_out, 5 * c_in]);
            let w_t = w_ck.clone().swap_dims(1, 2);
            let w_kc = Tensor::<3>::from_data(w_t.clone().into_data(), &device);
            interleaved(
                title,
                batch,
                iters,
                vec![
                    (
                        "Conv1d::forward (flex conv kernel)",
                        Box::new(|| drop(conv.forward(x.clone()))),
                    ),
                    (
                        "conv1d_nlc (pad + unfold + matmul + bias)",
                        Box::new(|| {
                            drop(ember_models::activity::conv1d_nlc(
                                conv,
                                x_nlc.clone(),
                                true,
                            ))
                        }),
                    ),
                    (
                        "pad + conv1d padding 0 (flex direct path)",
                        Box::new(|| {
                            let xp = x.clone().pad([(2, 2)], 0.0f32);
                            drop(burn::tensor::module::conv1d(
                                xp,
                                conv.weight.val(),
                                conv.bias.as_ref().map(|b| b.val()),
                                burn::tensor::ops::ConvOptions::new([1], [0], [1], 1),
                            ))
                        }),
                    ),
                    (
                        "  matmul, rhs contiguous [k c_in, c_out]",
                        Box::new(|| {
                            let [b, l, c] = x_nlc.dims();
                            let rows: Tensor<3> = x_nlc
                                .clone()
                                .pad([(2, 2), (0, 0)], 0.0f32)
                                .reshape([b, (l + 4) * c])
                                .unfold(1, 5 * c, c);
                            drop(rows.matmul(w_kc.clone()))
                        }),
                    ),
                    (
                        "  matmul, rhs transposed view",
                        Box::new(|| {
                            let [b, l, c] = x_nlc.dims();
                            let rows: Tensor<3> = x_nlc
                                .clone()
                                .pad([(2, 2), (0, 0)], 0.0f32)
                                .reshape([b, (l + 4) * c])
                                .unfold(1, 5 * c, c);
                            drop(rows.matmul(w_t.clone()))
                        }),
                    ),
                    (
                        "  matmul, output channel-major",
                        Box::new(|| {
                            let [b, l, c] = x_nlc.dims();
                            let rows: Tensor<3> = x_nlc
                                .clone()
                                .pad([(2, 2), (0, 0)], 0.0f32)
                                .reshape([b, (l + 4) * c])
                                .unfold(1, 5 * c, c);
                            drop(w_ck.clone().matmul(rows.swap_dims(1, 2)))
                        }),
                    ),
                    (
                        "  weight swap copy only",
                        Box::new(|| {
                            drop(conv.weight.val().swap_dims(1, 2).reshape([c_out, 5 * c_in]))
                        }),
                    ),
                    (
                        "  pad only",
                        Box::new(|| drop(x_nlc.clone().pad([(2, 2), (0, 0)], 0.0f32))),
                    ),
                    (
                        "  weight permute copy only",
                        Box::new(|| drop(conv.weight.val().permute([2, 1, 0]).into_data())),
                    ),
                    (
                        "  relu only",
                        Box::new(|| drop(burn::tensor::activation::relu(x_nlc.clone()))),
                    ),
                ],
            );
        }
    }
    // The autoencoder's transposed convolutions (still flex's kernel) next to a convolution.
    let enc1 = Conv1dConfig::new(channels, hidden, 5)
        .with_stride(2)
        .with_padding(PaddingConfig1d::Explicit(2, 2))
        .init(&device);
    let up = |i: usize, o: usize| {
        ConvTranspose1dConfig::new([i, o], 4)
            .with_stride(2)
            .with_padding(1)
            .init(&device)
    };
    let (dec1, dec2) = (up(2 * hidden, hidden), up(hidden, channels));
    for batch in [1usize, 32] {
        let iters = if batch == 1 { 4000 } else { 400 };
        let random = |c: usize, l: usize| {
            Tensor::<3>::random([batch, c, l], burn::tensor::Distribution::Default, &device)
        };
        let (x, h1, h2) = (
            random(channels, window),
            random(2 * hidden, window / 4),
            random(hidden, window / 2),
        );
        let x_nlc = Tensor::<3>::from_data(x.clone().swap_dims(1, 2).into_data(), &device);
        interleaved(
            "anomaly layers",
            batch,
            iters,
            vec![
                (
                    "enc1 Conv1d::forward 6→16 s2",
                    Box::new(|| drop(enc1.forward(x.clone()))),
                ),
                (
                    "enc1 conv1d_nlc",
                    Box::new(|| {
                        drop(ember_models::activity::conv1d_nlc(
                            &enc1,
                            x_nlc.clone(),
                            true,
                        ))
                    }),
                ),
                (
                    "dec1 ConvTranspose1d 32→16 ×25",
                    Box::new(|| drop(dec1.forward(h1.clone()))),
                ),
                (
                    "dec2 ConvTranspose1d 16→6 ×50",
                    Box::new(|| drop(dec2.forward(h2.clone()))),
                ),
            ],
        );
    }
    Ok(())
}
