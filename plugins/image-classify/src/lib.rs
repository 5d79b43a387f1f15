//! Image classification: decode, resize and normalise inside the sandbox, run the classifier
//! through wasi-nn, return the top-k labels.
//!
//! Input `image` (BYTES, one JPEG or PNG file per element; several make a batch). Each image
//! is converted to RGB, its shorter side resized to 256 (bilinear), centre-cropped to 224x224
//! and normalised as EfficientNet-Lite expects ((x - 127) / 128), then batched as FP32
//! `[n, 3, 224, 224]`.
//!
//! Outputs: `labels` (BYTES `[n, k]`), `probabilities` (FP32 `[n, k]`, softmax) and
//! `indices` (INT64 `[n, k]`). Parameters: `k` (5), `model` (`efficientnet-lite0`),
//! `labels` (default `/models/<model>/imagenet1k_clean_names.json`: a JSON list of names).

use std::sync::OnceLock;

use eir_guest::nn::{Graph, output};
use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

struct ImageClassify;

const SIZE: u32 = 224;
const RESIZE: u32 = 256;
/// Most pixels an image may have, read from its header before it is decoded (a 20-megapixel
/// photo; a decompression bomb declares far more).
pub const MAX_PIXELS: u64 = 40_000_000;
/// Most images per request.
pub const MAX_IMAGES: usize = 64;

/// Class names, read once per instance.
static LABELS: OnceLock<(String, Vec<String>)> = OnceLock::new();

fn labels(path: &str) -> Result<&'static [String]> {
    if let Some((p, l)) = LABELS.get()
        && p == path
    {
        return Ok(l);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid_input(format!("cannot read labels `{path}`: {e} (is the model granted?)")))?;
    let names: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| Error::invalid_input(format!("labels `{path}` is not a JSON list: {e}")))?;
    Ok(&LABELS.get_or_init(|| (path.to_string(), names)).1)
}

/// One image as normalised CHW floats.
fn preprocess(bytes: &[u8], k: usize) -> Result<Vec<f32>> {
    let bad = |e: image::ImageError| Error::invalid_input(format!("image {k}: {e}"));
    let reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(e.into()))?;
    let (w, h) = reader.into_dimensions().map_err(bad)?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(Error::invalid_input(format!("image {k} is {w}x{h}: over the {MAX_PIXELS}-pixel cap")));
    }
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(e.into()))?;
    // The decoder's own allocation cap too, for formats whose header understates the work.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(MAX_PIXELS * 4 * 2);
    reader.limits(limits);
    let img = reader.decode().map_err(bad)?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(Error::invalid_input(format!("image {k} is empty")));
    }
    let scale = RESIZE as f32 / w.min(h) as f32;
    let (nw, nh) = (((w as f32 * scale).round() as u32).max(SIZE), ((h as f32 * scale).round() as u32).max(SIZE));
    // Resizing to nw x nh and then cropping the centre is resizing the centre's source box
    // straight to 224x224 with the same filter: only the kept pixels are computed (the crop
    // drops up to half of a landscape photo). fast_image_resize's convolution is Pillow's, the
    // reference's resize.
    let (left, top) = ((nw - SIZE) / 2, (nh - SIZE) / 2);
    let (sx, sy) = (f64::from(w) / f64::from(nw), f64::from(h) / f64::from(nh));
    let fir = |e: &dyn std::fmt::Display| Error::internal(format!("image {k}: resizing: {e}"));
    let rgb = img.into_rgb8();
    let src = Image::from_vec_u8(w, h, rgb.into_raw(), PixelType::U8x3).map_err(|e| fir(&e))?;
    let mut crop = Image::new(SIZE, SIZE, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(
        f64::from(left) * sx,
        f64::from(top) * sy,
        f64::from(SIZE) * sx,
        f64::from(SIZE) * sy,
    );
    Resizer::new().resize(&src, &mut crop, &options).map_err(|e| fir(&e))?;
    let plane = (SIZE * SIZE) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in crop.buffer().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * plane + i] = (f32::from(v) - 127.0) / 128.0;
        }
    }
    Ok(chw)
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

impl Plugin for ImageClassify {
    fn metadata() -> Metadata {
        Metadata {
            description: "Image classification with EfficientNet-Lite0: JPEG/PNG in, top-k ImageNet labels out".into(),
            inputs: vec![TensorSpec::new("image", Datatype::Bytes, [-1])],
            outputs: vec![
                TensorSpec::new("labels", Datatype::Bytes, [-1, -1]),
                TensorSpec::new("probabilities", Datatype::Fp32, [-1, -1]),
                TensorSpec::new("indices", Datatype::Int64, [-1, -1]),
            ],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let images = request.blobs("image")?;
        if images.is_empty() {
            return Err(Error::invalid_input("`image` holds no images"));
        }
        if images.len() > MAX_IMAGES {
            return Err(Error::invalid_input(format!(
                "`image` holds {} images; at most {MAX_IMAGES} per request",
                images.len()
            )));
        }
        let model = request.param("model").unwrap_or("efficientnet-lite0");
        let k: usize = request.param_or("k", 5)?;
        let graph = Graph::load_by_name(model)?;
        let default_labels = format!("/models/{model}/imagenet1k_clean_names.json");
        let names = labels(request.param("labels").unwrap_or(&default_labels))?;

        let mut batch = Vec::with_capacity(images.len() * 3 * (SIZE * SIZE) as usize);
        for (i, img) in images.iter().enumerate() {
            batch.extend(preprocess(img, i)?);
        }
        let n = images.len() as u64;
        let input = Tensor::new("input", [n, 3, u64::from(SIZE), u64::from(SIZE)], batch)?;
        let outputs = graph.session()?.compute(&[&input])?;
        let logits = output(&outputs, "logits")?;
        let classes = *logits.shape.last().ok_or_else(|| Error::model("logits without a class axis"))? as usize;
        if classes != names.len() {
            return Err(Error::model(format!("the model has {classes} classes, the labels {}", names.len())));
        }
        let k = k.clamp(1, classes);
        let (mut labels_out, mut probs, mut indices) = (Vec::new(), Vec::new(), Vec::new());
        for row in logits.values::<f32>()?.chunks(classes) {
            let p = softmax(row);
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for &i in &order[..k] {
                labels_out.push(names[i].clone().into_bytes());
                probs.push(p[i]);
                indices.push(i as i64);
            }
        }
        let shape = [n, k as u64];
        let mut labels_t = Tensor::bytes("labels", labels_out);
        labels_t.shape = shape.to_vec();
        Ok(Response::new()
            .with(labels_t)
            .with(Tensor::new("probabilities", shape, probs)?)
            .with(Tensor::new("indices", shape, indices)?))
    }
}

eir_guest::export_plugin!(ImageClassify);
