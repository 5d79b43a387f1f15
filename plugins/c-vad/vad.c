// Voice-activity detection in C: WAV parsing and audio framing around Silero VAD (wasi-nn).
//
// Written against the WIT alone, with bindings from `wit-bindgen c` (see the Makefile). It is
// the Rust `vad` plugin's pipeline, done in C: same inputs, outputs and parameters, and the
// same numbers, which the end-to-end tests check.
//
// Input `audio`: one WAV file (BYTES): 16 kHz or 8 kHz, 16-bit integer or 32-bit float PCM;
// several channels are averaged to mono. The samples are cut into chunks of 512 (256 at 8 kHz),
// each sent with the last 64 (32) samples before it as context and the model's recurrent state
// carried from chunk to chunk, as Silero's own code does; the last chunk is zero-padded.
//
// Outputs: `probabilities` (FP32 [chunks]), `segments` (FP32 [n, 2], start and end in seconds),
// `chunk_seconds` (FP32 [1]). Parameters: `threshold` (0.5), `min_speech_ms` (250),
// `min_silence_ms` (100), `speech_pad_ms` (30), `model` (silero-vad).

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline.h"

typedef eir_plugin_types_error_t plugin_error_t;

// Fills `err` with a formatted message; returns false so that callers can `return fail(...)`.
static bool fail(plugin_error_t *err, eir_plugin_types_error_code_t code, const char *fmt, ...) {
  char message[512];
  va_list args;
  va_start(args, fmt);
  vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  err->code = code;
  pipeline_string_dup(&err->message, message);
  return false;
}

// ---------------------------------------------------------------------------------------------
// WAV decoding

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

typedef struct {
  float *samples;  // mono, in [-1, 1)
  size_t len;
  uint32_t rate;
} audio_t;

// Decodes a RIFF/WAVE file: walks the chunks for `fmt ` and `data`, then averages the channels.
static bool decode_wav(const uint8_t *wav, size_t size, audio_t *out, plugin_error_t *err) {
  const uint32_t INVALID = EIR_PLUGIN_TYPES_ERROR_CODE_INVALID_INPUT;
  if (size < 12 || memcmp(wav, "RIFF", 4) != 0 || memcmp(wav + 8, "WAVE", 4) != 0)
    return fail(err, INVALID, "not a WAV file: no RIFF/WAVE header");
  uint16_t format = 0, channels = 0, bits = 0;
  uint32_t rate = 0;
  const uint8_t *data = NULL;
  size_t data_len = 0;
  for (size_t at = 12; at + 8 <= size;) {
    uint32_t chunk_len = le32(wav + at + 4);
    const uint8_t *body = wav + at + 8;
    size_t available = size - at - 8;
    if (memcmp(wav + at, "fmt ", 4) == 0) {
      if (chunk_len < 16 || chunk_len > available) return fail(err, INVALID, "not a WAV file: short fmt chunk");
      format = le16(body);
      channels = le16(body + 2);
      rate = le32(body + 4);
      bits = le16(body + 14);
      // WAVE_FORMAT_EXTENSIBLE: the real format is the first two bytes of the sub-format GUID.
      if (format == 0xfffe && chunk_len >= 26) format = le16(body + 24);
    } else if (memcmp(wav + at, "data", 4) == 0) {
      if (chunk_len > available) return fail(err, INVALID, "corrupt WAV data: the data chunk is truncated");
      data = body;
      data_len = chunk_len;
      break;
    }
    if (chunk_len > available) break;
    at += 8 + (size_t)chunk_len + (chunk_len & 1);  // chunks are padded to even sizes
  }
  if (channels == 0) return fail(err, INVALID, "not a WAV file: no fmt chunk");
  if (data == NULL) return fail(err, INVALID, "not a WAV file: no data chunk");
  size_t width;
  if (format == 1 && bits == 16) width = 2;
  else if (format == 3 && bits == 32) width = 4;
  else return fail(err, INVALID, "unsupported WAV sample format %s %u-bit (use 16-bit PCM)", format == 3 ? "Float" : "Int", bits);

  size_t frame = width * channels;
  size_t frames = data_len / frame;
  if (data_len % frame != 0) return fail(err, INVALID, "corrupt WAV data: %zu bytes is not whole frames", data_len);
  float *mono = malloc((frames ? frames : 1) * sizeof(float));
  if (mono == NULL) return fail(err, EIR_PLUGIN_TYPES_ERROR_CODE_INTERNAL, "out of memory for %zu samples", frames);
  for (size_t i = 0; i < frames; i++) {
    float sum = 0.0f;
    for (uint16_t c = 0; c < channels; c++) {
      const uint8_t *p = data + i * frame + c * width;
      if (width == 2) {
        sum += (float)(int16_t)le16(p) / 32768.0f;
      } else {
        uint32_t bits32 = le32(p);
        float f;
        memcpy(&f, &bits32, sizeof f);
        sum += f;
      }
    }
    mono[i] = sum / (float)channels;
  }
  out->samples = mono;
  out->len = frames;
  out->rate = rate;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Request parameters

static const pipeline_string_t *param(const eir_plugin_types_request_t *request, const char *name) {
  size_t n = strlen(name);
  for (size_t i = 0; i < request->parameters.len; i++) {
    const pipeline_string_t *key = &request->parameters.ptr[i].f0;
    if (key->len == n && memcmp(key->ptr, name, n) == 0) return &request->parameters.ptr[i].f1;
  }
  return NULL;
}

// Copies a parameter's value into `buf` as a C string; false when it is absent.
static bool param_text(const eir_plugin_types_request_t *request, const char *name, char *buf, size_t cap) {
  const pipeline_string_t *value = param(request, name);
  if (value == NULL) return false;
  size_t n = value->len < cap - 1 ? value->len : cap - 1;
  memcpy(buf, value->ptr, n);
  buf[n] = 0;
  return true;
}

static bool param_ms(const eir_plugin_types_request_t *request, const char *name, uint64_t fallback, uint32_t rate,
                     uint64_t *samples, plugin_error_t *err) {
  char text[32];
  uint64_t ms = fallback;
  if (param_text(request, name, text, sizeof text)) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (text[0] < '0' || text[0] > '9' || *end != 0 || errno != 0 || v > UINT32_MAX)
      return fail(err, EIR_PLUGIN_TYPES_ERROR_CODE_INVALID_INPUT, "parameter `%s`: `%s` is not a whole number of milliseconds", name, text);
    ms = v;
  }
  *samples = ms * rate / 1000;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Segmentation: Silero's `get_speech_timestamps` on per-chunk probabilities. Speech starts when
// a chunk reaches `threshold` and ends after `min_silence` samples of chunks below
// `threshold - 0.15`; segments shorter than `min_speech` are dropped and the rest padded by
// `pad` samples without overlapping their neighbours.

typedef struct {
  size_t start, end;
} segment_t;

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

static size_t find_segments(const float *probs, size_t chunks, size_t chunk, size_t total, float threshold,
                            uint64_t min_speech, uint64_t min_silence, uint64_t pad, segment_t *out) {
  float neg = threshold - 0.15f > 0.01f ? threshold - 0.15f : 0.01f;
  size_t n = 0;
  bool speaking = false, silent = false;
  size_t start = 0, silence_since = 0;
  for (size_t k = 0; k < chunks; k++) {
    size_t at = k * chunk;
    if (probs[k] >= threshold) {
      silent = false;
      if (!speaking) {
        speaking = true;
        start = at;
      }
    } else if (probs[k] < neg && speaking) {
      if (!silent) {
        silent = true;
        silence_since = at;
      }
      if (at + chunk - silence_since >= min_silence) {
        if (silence_since - start >= min_speech) out[n++] = (segment_t){start, silence_since};
        speaking = silent = false;
      }
    }
  }
  if (speaking && total - start >= min_speech) out[n++] = (segment_t){start, total};
  // Pad, splitting the gap when neighbours would overlap (against the unpadded neighbours).
  size_t prev_end = 0;
  for (size_t i = 0; i < n; i++) {
    segment_t s = out[i];
    size_t next_start = i + 1 < n ? out[i + 1].start : total;
    out[i].start = s.start - (i == 0 ? min_size(pad, s.start) : min_size(pad, (s.start - prev_end) / 2));
    out[i].end = s.end + (i + 1 == n ? min_size(pad, total - s.end) : min_size(pad, (next_start - s.end) / 2));
    prev_end = s.end;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// wasi-nn

// Turns a wasi-nn error into the plugin's `model-error`, dropping the error resource.
static bool nn_fail(plugin_error_t *err, wasi_nn_errors_own_error_t nn_err, const char *what) {
  pipeline_string_t data;
  wasi_nn_errors_method_error_data(wasi_nn_errors_borrow_error(nn_err), &data);
  fail(err, EIR_PLUGIN_TYPES_ERROR_CODE_MODEL_ERROR, "%s: %.*s", what, (int)data.len, (const char *)data.ptr);
  pipeline_string_free(&data);
  wasi_nn_errors_error_drop_own(nn_err);
  return false;
}

static wasi_nn_tensor_own_tensor_t make_tensor(const uint32_t *dims, size_t rank, wasi_nn_tensor_tensor_type_t ty,
                                               const void *bytes, size_t len) {
  wasi_nn_tensor_tensor_dimensions_t d = {(uint32_t *)dims, rank};
  wasi_nn_tensor_tensor_data_t data = {(uint8_t *)bytes, len};
  return wasi_nn_tensor_constructor_tensor(&d, ty, &data);
}

static bool name_is(const pipeline_string_t *s, const char *name) {
  return s->len == strlen(name) && memcmp(s->ptr, name, s->len) == 0;
}

// Runs the model over every chunk; `probs` gets one probability a chunk.
static bool run_vad(const char *model, const audio_t *audio, size_t chunk, size_t context_len, float *probs,
                    plugin_error_t *err) {
  pipeline_string_t name;
  pipeline_string_set(&name, model);
  wasi_nn_graph_own_graph_t graph;
  wasi_nn_errors_own_error_t nn_err;
  char what[128];
  snprintf(what, sizeof what, "loading `%s`", model);
  if (!wasi_nn_graph_load_by_name(&name, &graph, &nn_err)) return nn_fail(err, nn_err, what);
  wasi_nn_graph_own_graph_execution_context_t ctx;
  snprintf(what, sizeof what, "running `%s`", model);
  if (!wasi_nn_graph_method_graph_init_execution_context(wasi_nn_graph_borrow_graph(graph), &ctx, &nn_err)) {
    wasi_nn_graph_graph_drop_own(graph);
    return nn_fail(err, nn_err, what);
  }

  bool ok = true;
  size_t width = context_len + chunk;
  float *x = calloc(width, sizeof(float));
  float state[2 * 128] = {0};
  int64_t sr = audio->rate;
  size_t chunks = (audio->len + chunk - 1) / chunk;
  for (size_t k = 0; ok && k < chunks; k++) {
    // x = the previous `context_len` samples, then this chunk, zero-padded.
    memmove(x, x + chunk, context_len * sizeof(float));
    size_t n = min_size(chunk, audio->len - k * chunk);
    memcpy(x + context_len, audio->samples + k * chunk, n * sizeof(float));
    memset(x + context_len + n, 0, (chunk - n) * sizeof(float));

    uint32_t input_dims[2] = {1, (uint32_t)width}, state_dims[3] = {2, 1, 128};
    wasi_nn_inference_named_tensor_t inputs[3];
    pipeline_string_set(&inputs[0].f0, "input");
    inputs[0].f1 = make_tensor(input_dims, 2, WASI_NN_TENSOR_TENSOR_TYPE_FP32, x, width * sizeof(float));
    pipeline_string_set(&inputs[1].f0, "state");
    inputs[1].f1 = make_tensor(state_dims, 3, WASI_NN_TENSOR_TENSOR_TYPE_FP32, state, sizeof state);
    pipeline_string_set(&inputs[2].f0, "sr");
    inputs[2].f1 = make_tensor(NULL, 0, WASI_NN_TENSOR_TENSOR_TYPE_I64, &sr, sizeof sr);
    wasi_nn_inference_list_named_tensor_t in = {inputs, 3}, outs;
    // The input tensors are owned handles: `compute` takes them.
    if (!wasi_nn_inference_method_graph_execution_context_compute(wasi_nn_inference_borrow_graph_execution_context(ctx),
                                                                   &in, &outs, &nn_err)) {
      ok = nn_fail(err, nn_err, what);
      break;
    }
    bool have_prob = false, have_state = false;
    for (size_t i = 0; i < outs.len; i++) {
      wasi_nn_tensor_borrow_tensor_t t = wasi_nn_tensor_borrow_tensor(outs.ptr[i].f1);
      bool is_output = name_is(&outs.ptr[i].f0, "output"), is_state = name_is(&outs.ptr[i].f0, "stateN");
      if ((is_output || is_state) && wasi_nn_tensor_method_tensor_ty(t) == WASI_NN_TENSOR_TENSOR_TYPE_FP32) {
        wasi_nn_tensor_tensor_data_t data;
        wasi_nn_tensor_method_tensor_data(t, &data);
        if (is_output && data.len >= sizeof(float)) {
          memcpy(&probs[k], data.ptr, sizeof(float));
          have_prob = true;
        } else if (is_state && data.len == sizeof state) {
          memcpy(state, data.ptr, sizeof state);
          have_state = true;
        }
        wasi_nn_tensor_tensor_data_free(&data);
      }
      wasi_nn_tensor_tensor_drop_own(outs.ptr[i].f1);
    }
    wasi_nn_inference_list_named_tensor_free(&outs);
    if (!have_prob || !have_state)
      ok = fail(err, EIR_PLUGIN_TYPES_ERROR_CODE_MODEL_ERROR, "`%s` did not return FP32 `output` and `stateN` [2, 1, 128]", model);
  }
  free(x);
  wasi_nn_inference_graph_execution_context_drop_own(ctx);
  wasi_nn_graph_graph_drop_own(graph);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// The exports

static eir_plugin_types_tensor_spec_t spec(const char *name, eir_plugin_types_datatype_t datatype, int64_t d0, int64_t d1,
                                           size_t rank) {
  eir_plugin_types_tensor_spec_t s;
  pipeline_string_dup(&s.name, name);
  s.datatype = datatype;
  s.shape.len = rank;
  s.shape.ptr = malloc(rank * sizeof(int64_t));
  s.shape.ptr[0] = d0;
  if (rank > 1) s.shape.ptr[1] = d1;
  return s;
}

// The returned values are freed by the generated post-return function: everything is malloc'd.
void exports_eir_plugin_handler_describe(exports_eir_plugin_handler_metadata_t *ret) {
  pipeline_string_dup(&ret->description, "Voice-activity detection in C: WAV framing around Silero VAD, speech segments out");
  ret->inputs.len = 1;
  ret->inputs.ptr = malloc(sizeof(eir_plugin_types_tensor_spec_t));
  ret->inputs.ptr[0] = spec("audio", EIR_PLUGIN_TYPES_DATATYPE_BYTES, 1, 0, 1);
  ret->outputs.len = 3;
  ret->outputs.ptr = malloc(3 * sizeof(eir_plugin_types_tensor_spec_t));
  ret->outputs.ptr[0] = spec("probabilities", EIR_PLUGIN_TYPES_DATATYPE_FP32, -1, 0, 1);
  ret->outputs.ptr[1] = spec("segments", EIR_PLUGIN_TYPES_DATATYPE_FP32, -1, 2, 2);
  ret->outputs.ptr[2] = spec("chunk_seconds", EIR_PLUGIN_TYPES_DATATYPE_FP32, 1, 0, 1);
}

// An FP32 output tensor that takes ownership of `values`.
static eir_plugin_types_tensor_t fp32_output(const char *name, float *values, size_t len, uint64_t d0, uint64_t d1,
                                             size_t rank) {
  eir_plugin_types_tensor_t t;
  pipeline_string_dup(&t.name, name);
  t.shape.len = rank;
  t.shape.ptr = malloc(rank * sizeof(uint64_t));
  t.shape.ptr[0] = d0;
  if (rank > 1) t.shape.ptr[1] = d1;
  t.data.tag = EIR_PLUGIN_TYPES_TENSOR_DATA_FP32;
  t.data.val.fp32.ptr = values;
  t.data.val.fp32.len = len;
  return t;
}

static bool handle(const eir_plugin_types_request_t *request, eir_plugin_types_response_t *ret, plugin_error_t *err) {
  const uint32_t INVALID = EIR_PLUGIN_TYPES_ERROR_CODE_INVALID_INPUT;
  const eir_plugin_types_tensor_t *input = NULL;
  for (size_t i = 0; i < request->inputs.len; i++)
    if (name_is(&request->inputs.ptr[i].name, "audio")) input = &request->inputs.ptr[i];
  if (input == NULL) return fail(err, INVALID, "missing input `audio`");
  if (input->data.tag != EIR_PLUGIN_TYPES_TENSOR_DATA_BYTES) return fail(err, INVALID, "`audio` must be BYTES (a WAV file)");
  if (input->data.val.bytes.len != 1)
    return fail(err, INVALID, "`audio` must hold one WAV file, got %zu", input->data.val.bytes.len);

  audio_t audio;
  if (!decode_wav(input->data.val.bytes.ptr[0].ptr, input->data.val.bytes.ptr[0].len, &audio, err)) return false;
  size_t chunk, context_len;
  if (audio.rate == 16000) chunk = 512, context_len = 64;
  else if (audio.rate == 8000) chunk = 256, context_len = 32;
  else {
    free(audio.samples);
    return fail(err, INVALID, "%u Hz audio: Silero VAD takes 16 kHz or 8 kHz", audio.rate);
  }

  char text[64], model[64] = "silero-vad";
  float threshold = 0.5f;
  if (param_text(request, "threshold", text, sizeof text)) {
    char *end;
    threshold = strtof(text, &end);
    if (end == text || *end != 0) {
      free(audio.samples);
      return fail(err, INVALID, "parameter `threshold`: `%s` is not a number", text);
    }
  }
  param_text(request, "model", model, sizeof model);
  uint64_t min_speech, min_silence, pad;
  if (!param_ms(request, "min_speech_ms", 250, audio.rate, &min_speech, err) ||
      !param_ms(request, "min_silence_ms", 100, audio.rate, &min_silence, err) ||
      !param_ms(request, "speech_pad_ms", 30, audio.rate, &pad, err)) {
    free(audio.samples);
    return false;
  }

  size_t chunks = (audio.len + chunk - 1) / chunk;
  float *probs = malloc((chunks ? chunks : 1) * sizeof(float));
  segment_t *segments = malloc((chunks ? chunks : 1) * sizeof(segment_t));
  float *bounds = malloc((chunks ? chunks : 1) * 2 * sizeof(float));
  float *chunk_seconds = malloc(sizeof(float));
  if (!probs || !segments || !bounds || !chunk_seconds) {
    free(audio.samples), free(probs), free(segments), free(bounds), free(chunk_seconds);
    return fail(err, EIR_PLUGIN_TYPES_ERROR_CODE_INTERNAL, "out of memory for %zu chunks", chunks);
  }
  if (!run_vad(model, &audio, chunk, context_len, probs, err)) {
    free(audio.samples), free(probs), free(segments), free(bounds), free(chunk_seconds);
    return false;
  }
  size_t n = find_segments(probs, chunks, chunk, audio.len, threshold, min_speech, min_silence, pad, segments);
  for (size_t i = 0; i < n; i++) {
    bounds[2 * i] = (float)segments[i].start / (float)audio.rate;
    bounds[2 * i + 1] = (float)segments[i].end / (float)audio.rate;
  }
  *chunk_seconds = (float)chunk / (float)audio.rate;
  free(segments);
  free(audio.samples);

  ret->parameters.len = 0;
  ret->parameters.ptr = NULL;
  ret->outputs.len = 3;
  ret->outputs.ptr = malloc(3 * sizeof(eir_plugin_types_tensor_t));
  ret->outputs.ptr[0] = fp32_output("probabilities", probs, chunks, chunks, 0, 1);
  ret->outputs.ptr[1] = fp32_output("segments", bounds, 2 * n, n, 2, 2);
  ret->outputs.ptr[2] = fp32_output("chunk_seconds", chunk_seconds, 1, 1, 0, 1);
  return true;
}

bool exports_eir_plugin_handler_handle(exports_eir_plugin_handler_request_t *request,
                                       exports_eir_plugin_handler_response_t *ret, exports_eir_plugin_handler_error_t *err) {
  bool ok = handle(request, ret, err);
  // Exported functions own their arguments.
  exports_eir_plugin_handler_request_free(request);
  return ok;
}
