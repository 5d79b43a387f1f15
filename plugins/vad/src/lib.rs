//! Voice-activity detection with Silero VAD (v5/v6 ONNX) through wasi-nn.
//!
//! Input `audio`: a WAV file (BYTES, one element): 16 kHz or 8 kHz, 16-bit integer or 32-bit
//! float PCM, mono (several channels are averaged). The audio is cut into chunks of 512
//! samples (256 at 8 kHz), each sent with the last 64 (32) samples of the previous chunk as
//! context and the model's recurrent state carried from chunk to chunk, as Silero's own code
//! does; the last chunk is zero-padded.
//!
//! Outputs: `probabilities` (FP32 `[chunks]`, speech probability per chunk), `segments`
//! (FP32 `[n, 2]`, start and end in seconds) and `chunk_seconds` (FP32 `[1]`).
//!
//! Parameters (defaults of Silero's `get_speech_timestamps`): `threshold` (0.5),
//! `min_speech_ms` (250), `min_silence_ms` (100), `speech_pad_ms` (30); `model` (`silero-vad`).
//!
//! Audio longer than [`MAX_SECONDS`] is refused (`invalid-input`, from the WAV header, before
//! it is decoded): a request's cost grows with its length, one model call per 32 ms.

use eir_guest::nn::{Graph, output};
use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};

struct Vad;

/// Longest audio one request may carry.
pub const MAX_SECONDS: u32 = 600;

/// Mono samples in [-1, 1) and their rate.
fn decode(wav: &[u8]) -> Result<(Vec<f32>, u32)> {
    let reader = hound::WavReader::new(wav).map_err(|e| Error::invalid_input(format!("not a WAV file: {e}")))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let seconds = reader.duration() / spec.sample_rate.max(1);
    if seconds > MAX_SECONDS {
        return Err(Error::invalid_input(format!(
            "the audio is {seconds} s long; at most {MAX_SECONDS} s per request (split it)"
        )));
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => reader
            .into_samples::<i16>()
            .map(|s| s.map(|s| f32::from(s) / 32768.0))
            .collect::<std::result::Result<_, _>>(),
        (hound::SampleFormat::Float, 32) => reader.into_samples::<f32>().collect::<std::result::Result<_, _>>(),
        (format, bits) => {
            return Err(Error::invalid_input(format!(
                "unsupported WAV sample format {format:?} {bits}-bit (use 16-bit PCM)"
            )));
        }
    }
    .map_err(|e| Error::invalid_input(format!("corrupt WAV data: {e}")))?;
    let mono = interleaved.chunks(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    Ok((mono, spec.sample_rate))
}

/// Silero's `get_speech_timestamps`, on per-chunk probabilities: speech starts when a chunk
/// reaches `threshold`, ends after `min_silence` of chunks below `threshold - 0.15`; segments
/// shorter than `min_speech` are dropped and the rest padded by `pad` (never overlapping).
struct Segmenter {
    threshold: f32,
    min_speech: usize,
    min_silence: usize,
    pad: usize,
}

impl Segmenter {
    fn segments(&self, probs: &[f32], chunk: usize, total: usize) -> Vec<(usize, usize)> {
        let neg = (self.threshold - 0.15).max(0.01);
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut start: Option<usize> = None;
        let mut silence_since: Option<usize> = None;
        for (k, &p) in probs.iter().enumerate() {
            let at = k * chunk;
            if p >= self.threshold {
                silence_since = None;
                if start.is_none() {
                    start = Some(at);
                }
            } else if p < neg
                && let Some(s) = start
            {
                let since = *silence_since.get_or_insert(at);
                if at + chunk - since >= self.min_silence {
                    if since - s >= self.min_speech {
                        out.push((s, since));
                    }
                    start = None;
                    silence_since = None;
                }
            }
        }
        if let Some(s) = start
            && total - s >= self.min_speech
        {
            out.push((s, total));
        }
        // Pad, splitting the gap when neighbours would overlap.
        let mut padded = out.clone();
        for i in 0..padded.len() {
            let prev_end = if i == 0 { 0 } else { out[i - 1].1 };
            let next_start = out.get(i + 1).map(|n| n.0).unwrap_or(total);
            let (s, e) = out[i];
            let gap_before = s - prev_end;
            let gap_after = next_start - e;
            padded[i].0 = s - if i == 0 { self.pad.min(s) } else { self.pad.min(gap_before / 2) };
            padded[i].1 = e + if i + 1 == out.len() { self.pad.min(total - e) } else { self.pad.min(gap_after / 2) };
        }
        padded
    }
}

impl Plugin for Vad {
    fn metadata() -> Metadata {
        Metadata {
            description: "Voice-activity detection with Silero VAD: WAV in, speech segments out".into(),
            inputs: vec![TensorSpec::new("audio", Datatype::Bytes, [1])],
            outputs: vec![
                TensorSpec::new("probabilities", Datatype::Fp32, [-1]),
                TensorSpec::new("segments", Datatype::Fp32, [-1, 2]),
                TensorSpec::new("chunk_seconds", Datatype::Fp32, [1]),
            ],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let blobs = request.blobs("audio")?;
        let [wav] = blobs else {
            return Err(Error::invalid_input(format!("`audio` must hold one WAV file, got {}", blobs.len())));
        };
        let (samples, rate) = decode(wav)?;
        let (chunk, context_len) = match rate {
            16000 => (512, 64),
            8000 => (256, 32),
            other => return Err(Error::invalid_input(format!("{other} Hz audio: Silero VAD takes 16 kHz or 8 kHz"))),
        };
        let ms = |name: &str, default: usize| -> Result<usize> {
            Ok(request.param_or::<usize>(name, default)?.saturating_mul(rate as usize) / 1000)
        };
        let segmenter = Segmenter {
            threshold: request.param_or("threshold", 0.5)?,
            min_speech: ms("min_speech_ms", 250)?,
            min_silence: ms("min_silence_ms", 100)?,
            pad: ms("speech_pad_ms", 30)?,
        };

        let graph = Graph::load_by_name(request.param("model").unwrap_or("silero-vad"))?;
        let session = graph.session()?;
        let sr = Tensor::new("sr", Vec::<u64>::new(), vec![rate as i64])?;
        let mut state = Tensor::new("state", [2, 1, 128], vec![0f32; 256])?;
        let mut context = vec![0f32; context_len];
        let mut probs = Vec::with_capacity(samples.len() / chunk + 1);
        for piece in samples.chunks(chunk) {
            let mut x = Vec::with_capacity(context_len + chunk);
            x.extend_from_slice(&context);
            x.extend_from_slice(piece);
            x.resize(context_len + chunk, 0.0);
            context.copy_from_slice(&x[chunk..]);
            let input = Tensor::new("input", [1, (context_len + chunk) as u64], x)?;
            let outputs = session.compute(&[&input, &state, &sr])?;
            let p = output(&outputs, "output")?.values::<f32>()?;
            probs.push(*p.first().ok_or_else(|| Error::model("empty VAD output"))?);
            let mut next = output(&outputs, "stateN")?.clone();
            next.name = "state".into();
            state = next;
        }
        let seconds = |s: usize| s as f32 / rate as f32;
        let segments: Vec<f32> = segmenter
            .segments(&probs, chunk, samples.len())
            .into_iter()
            .flat_map(|(s, e)| [seconds(s), seconds(e)])
            .collect();
        let n = probs.len() as u64;
        Ok(Response::new()
            .with(Tensor::new("probabilities", [n], probs)?)
            .with(Tensor::new("segments", [segments.len() as u64 / 2, 2], segments)?)
            .with(Tensor::new("chunk_seconds", [1], vec![seconds(chunk)])?))
    }
}

eir_guest::export_plugin!(Vad);
