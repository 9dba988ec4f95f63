//! Backbones: parameter counts and multiply-accumulates at full size against the numbers
//! `scripts/make_model_fixtures.py` measured on PyTorch re-creations of the reference
//! definitions; forward shapes at CPU sizes; PyTorch parity of loaded `.pth` state dicts.

use candle_core::{Device, Tensor};
use fpipe_stages::models::{
    iresnet, mobilefacenet, vargfacenet, Backbone, BackboneConfig, ParamStore,
};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("reference_counts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Builds the model (on CPU, seeded init) and returns its parameter count.
fn params_of(cfg: &BackboneConfig) -> usize {
    let store = ParamStore::new(0);
    Backbone::new(cfg, store.vb(&Device::Cpu)).unwrap();
    store.num_params("")
}

fn check(name: &str, cfg: BackboneConfig) {
    let r = &reference()[name];
    assert_eq!(
        params_of(&cfg) as u64,
        r["parameters"].as_u64().unwrap(),
        "{name} parameters"
    );
    assert_eq!(cfg.macs(), r["macs"].as_u64().unwrap(), "{name} MACs");
}

#[test]
fn iresnet_counts_match_reference() {
    for depth in [18, 34, 50, 100, 200] {
        let cfg = BackboneConfig::Iresnet(iresnet::Config {
            depth,
            ..Default::default()
        });
        check(&format!("iresnet{depth}"), cfg);
    }
}

#[test]
fn mobilefacenet_counts_match_reference() {
    check(
        "mobilefacenet",
        BackboneConfig::Mobilefacenet(Default::default()),
    );
    check(
        "mobilefacenet_large",
        BackboneConfig::Mobilefacenet(mobilefacenet::Config {
            blocks: [2, 8, 12, 4],
            scale: 4,
            ..Default::default()
        }),
    );
}

#[test]
fn vargfacenet_counts_match_reference() {
    check(
        "vargfacenet",
        BackboneConfig::Vargfacenet(Default::default()),
    );
    check(
        "vargfacenet_no_se",
        BackboneConfig::Vargfacenet(vargfacenet::Config {
            use_se: false,
            ..Default::default()
        }),
    );
}

#[test]
fn cpu_sized_backbones_forward_in_train_and_eval() {
    let dev = Device::Cpu;
    let cfgs = [
        BackboneConfig::Iresnet(iresnet::Config {
            depth: 18,
            width: 0.125,
            input_size: 32,
            num_features: 16,
        }),
        BackboneConfig::Mobilefacenet(mobilefacenet::Config {
            width: 0.125,
            input_size: 32,
            num_features: 16,
            ..Default::default()
        }),
        BackboneConfig::Vargfacenet(vargfacenet::Config {
            width: 0.2,
            input_size: 32,
            num_features: 16,
            ..Default::default()
        }),
    ];
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    for cfg in cfgs {
        let store = ParamStore::new(1);
        let m = Backbone::new(&cfg, store.vb(&dev)).unwrap();
        for train in [true, false] {
            let y = m.forward(&x, train).unwrap();
            assert_eq!(y.dims(), &[2, 16], "{}", cfg.name());
            let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|f| f.is_finite()), "{}", cfg.name());
        }
    }
}

#[test]
fn same_seed_gives_same_weights() {
    let cfg = BackboneConfig::Mobilefacenet(mobilefacenet::Config {
        width: 0.125,
        input_size: 32,
        ..Default::default()
    });
    let a = ParamStore::new(5);
    let b = ParamStore::new(5);
    Backbone::new(&cfg, a.vb(&Device::Cpu)).unwrap();
    Backbone::new(&cfg, b.vb(&Device::Cpu)).unwrap();
    for ((ka, va), (kb, vb)) in a.vars().iter().zip(b.vars().iter()) {
        assert_eq!(ka, kb);
        let x: Vec<f32> = va.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = vb.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{ka}");
    }
}

/// Loads `file` into the candle model of `cfg` and compares eval-mode embeddings with those
/// PyTorch computed on the same input (`parity_tiny.pth`).
fn parity(cfg: BackboneConfig, file: &str, key: &str) {
    let dev = Device::Cpu;
    let store = ParamStore::new(0);
    let m = Backbone::new(&cfg, store.vb(&dev)).unwrap();
    store.load_pth("", &fixtures().join(file)).unwrap();
    let t: std::collections::HashMap<String, Tensor> =
        candle_core::pickle::read_all(fixtures().join("parity_tiny.pth"))
            .unwrap()
            .into_iter()
            .collect();
    let y = m.forward(&t["input"], false).unwrap();
    let want = &t[key];
    let diff = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{file}: max |diff| {diff} (scale {scale})"
    );
}

#[test]
fn iresnet_pth_matches_pytorch() {
    parity(
        BackboneConfig::Iresnet(iresnet::Config {
            depth: 18,
            width: 0.125,
            input_size: 32,
            num_features: 64,
        }),
        "iresnet_tiny.pth",
        "iresnet_out",
    );
}

#[test]
fn mobilefacenet_pth_matches_pytorch() {
    parity(
        BackboneConfig::Mobilefacenet(mobilefacenet::Config {
            width: 0.125,
            input_size: 32,
            num_features: 64,
            ..Default::default()
        }),
        "mbf_tiny.pth",
        "mbf_out",
    );
}

#[test]
fn pth_with_wrong_shapes_is_rejected_with_the_tensor_name() {
    let store = ParamStore::new(0);
    let cfg = BackboneConfig::Iresnet(iresnet::Config {
        depth: 18,
        width: 0.25,
        input_size: 32,
        num_features: 64,
    });
    Backbone::new(&cfg, store.vb(&Device::Cpu)).unwrap();
    let e = store
        .load_pth("", &fixtures().join("iresnet_tiny.pth"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has shape [8]") && e.contains("expects [16]"),
        "{e}"
    );
}
