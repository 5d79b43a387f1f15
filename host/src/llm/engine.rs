//! The generation engine of one model: a step loop with continuous batching (as llama.cpp's
//! server runs its slots), on its own thread, computing on the shared compute pool.
//!
//! Each step: requests whose caller went away or whose deadline passed leave (their KV cache
//! is freed at once); waiting requests are admitted while a sequence slot and KV budget are
//! free, fairest tenant first (the least tokens served for its weight); then one forward pass
//! runs every active sequence together: one token each for those decoding, a chunk of the
//! prompt for those prefilling (at most [`Settings::prefill_chunk`] prompt tokens per step, so
//! a long prompt delays the others' next tokens by a bounded amount). The step's time is
//! charged to the tenants by their share of its tokens.
//!
//! Batching cannot change an answer: every row of a step is computed independently of the
//! others (see [`Llama::forward`](crate::nn::backends::gguf::llama::Llama::forward)), so a
//! sequence's tokens are the same alone or among others.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::LlmError;
use super::sample::{Sampler, Sampling};
use crate::nn::backends::gguf::GgufModel;
use crate::nn::backends::gguf::llama::{KvCache, Step};
use crate::nn::backends::gguf::tokenizer::{TextStream, Token};
use crate::nn::meter::{CancelOnDrop, CancelToken, Meter};
use crate::scheduler::Tenant;

/// How an engine runs its model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Sequences decoding at once.
    pub max_sequences: usize,
    /// Most tokens (prompt + answer) one sequence may hold; at most the model's own context.
    pub max_context: usize,
    /// Most prompt tokens prefilled per step, across sequences.
    pub prefill_chunk: usize,
    /// Bytes all sequences' KV caches may take together.
    pub kv_budget: u64,
    /// Requests that may wait for a slot; more are refused (busy).
    pub max_waiting: usize,
    /// Bytes of activations one step may hold.
    pub step_memory: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_sequences: 8,
            max_context: 2048,
            prefill_chunk: 256,
            kv_budget: 1 << 30,
            max_waiting: 64,
            step_memory: 256 << 20,
        }
    }
}

/// One generation to run.
pub struct GenerateRequest {
    /// The prompt's tokens (a rendered chat template, or raw text).
    pub prompt: Vec<Token>,
    /// How to pick tokens.
    pub sampling: Sampling,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Texts that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Who pays for it.
    pub tenant: Arc<Tenant>,
    /// When to give up.
    pub deadline: Option<Instant>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model ended its turn, or a stop text appeared.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The caller went away.
    Cancelled,
    /// The deadline passed.
    Deadline,
    /// The sequence filled its context.
    ContextFull,
    /// The computation failed (the message is in [`Event::Done`]).
    Error,
}

/// Tokens a generation consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// What a generation yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// New text (never a split UTF-8 character; text that may start a stop string is held
    /// back until it is known not to) and the tokens generated since the last chunk.
    Chunk {
        /// Text.
        text: String,
        /// Token ids.
        tokens: Vec<Token>,
    },
    /// The end, always the last event.
    Done {
        /// Why.
        finish: Finish,
        /// Tokens consumed.
        usage: Usage,
        /// What failed, for [`Finish::Error`].
        error: Option<String>,
    },
}

/// A running generation: its events in order. Dropping it cancels the generation, which then
/// frees its slot and KV cache within one step.
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Event>,
    cancel: CancelToken,
    _on_drop: CancelOnDrop,
}

impl Generation {
    /// The next event (`None` after `Done`).
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// [`next`](Self::next) for threads outside the async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Stops the generation (it ends with [`Finish::Cancelled`]).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// [`next`](Self::next) for a plugin call: an event already there is taken at once;
    /// otherwise the call gives up its tenant's turn at running plugin code while it waits.
    /// `Err` with what `stop` gave if `stop` completes first.
    pub async fn next_or<R>(
        &mut self,
        tenant: &crate::scheduler::Tenant,
        turn: &crate::scheduler::TurnSlot,
        stop: impl std::future::Future<Output = R>,
    ) -> Result<Option<Event>, R> {
        if let Ok(event) = self.rx.try_recv() {
            return Ok(Some(event));
        }
        crate::scheduler::without_turn(tenant, turn, async {
            tokio::select! {
                event = self.rx.recv() => Ok(event),
                r = stop => Err(r),
            }
        })
        .await
    }

    /// A token that cancels this generation, for whoever must be able to stop it without
    /// holding it (e.g. at the end of the plugin call that started it).
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }
}

/// Counters of an engine, for metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Sequences in the running batch.
    pub active: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// Bytes of KV cache held.
    pub kv_bytes: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Sum over steps of the sequences in each (mean batch = `batched / steps`).
    pub batched: u64,
    /// Tokens generated.
    pub generated: u64,
    /// Prompt tokens prefilled.
    pub prefilled: u64,
    /// Per tenant with active sequences: (sequences, bytes of KV cache).
    pub by_tenant: std::collections::BTreeMap<String, (usize, u64)>,
}

impl Stats {
    fn set_active(&mut self, active: &[Seq], kv_used: u64) {
        self.active = active.len();
        self.kv_bytes = kv_used;
        self.by_tenant.clear();
        for s in active {
            let e = self.by_tenant.entry(s.p.req.tenant.name().to_string()).or_default();
            e.0 += 1;
            e.1 += s.kv_bytes;
        }
    }
}

/// A request waiting for a slot.
struct Pending {
    req: GenerateRequest,
    tx: mpsc::UnboundedSender<Event>,
    cancel: CancelToken,
    /// Tokens its KV cache holds (prompt + answer, capped by the context).
    kv_tokens: usize,
}

impl Pending {
    /// Why it should stop now, if it should.
    fn gone(&self) -> Option<Finish> {
        if self.cancel.is_cancelled() || self.tx.is_closed() {
            Some(Finish::Cancelled)
        } else if self.req.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(Finish::Deadline)
        } else {
            None
        }
    }

    fn done(&self, finish: Finish, completion: usize, error: Option<String>) {
        let usage = Usage { prompt_tokens: self.req.prompt.len(), completion_tokens: completion };
        let _ = self.tx.send(Event::Done { finish, usage, error });
    }
}

struct State {
    waiting: VecDeque<Pending>,
    shutdown: bool,
    stats: Stats,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The generation engine of one model.
pub struct Engine {
    model: Arc<GgufModel>,
    settings: Settings,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the step loop for `model`.
    pub fn new(model: Arc<GgufModel>, settings: Settings) -> std::io::Result<Engine> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { waiting: VecDeque::new(), shutdown: false, stats: Stats::default() }),
            wake: Condvar::new(),
        });
        let thread = {
            let (model, settings, shared) = (model.clone(), settings.clone(), shared.clone());
            std::thread::Builder::new().name("eir-llm".into()).spawn(move || run(&model, &settings, &shared))?
        };
        Ok(Engine { model, settings, shared, thread: Some(thread) })
    }

    /// The model.
    pub fn model(&self) -> &Arc<GgufModel> {
        &self.model
    }

    /// The context one sequence gets: the configured cap or the model's, whichever is less.
    pub fn context(&self) -> usize {
        self.settings.max_context.min(self.model.llama.config.context)
    }

    /// Queues a generation. Refused at once when a parameter is bad, the prompt does not fit
    /// the context, or too many requests wait already.
    pub fn submit(&self, req: GenerateRequest) -> Result<Generation, LlmError> {
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            return Err(LlmError::BadParameter("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(LlmError::BadParameter("max_tokens must be at least 1".into()));
        }
        let context = self.context();
        if req.prompt.len() >= context {
            return Err(LlmError::PromptTooLong(format!(
                "the prompt has {} tokens; this model's context holds {context} (prompt and answer)",
                req.prompt.len()
            )));
        }
        let kv_tokens = req.prompt.len().saturating_add(req.max_tokens).min(context);
        let bytes = KvCache::bytes_for(&self.model.llama.config, kv_tokens);
        if bytes > self.settings.kv_budget {
            return Err(LlmError::BadParameter(format!(
                "{kv_tokens} tokens of KV cache take {bytes} bytes, more than the engine's whole budget of {} (lower max_tokens)",
                self.settings.kv_budget
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancelToken::new();
        {
            let mut st = self.shared.lock();
            if st.waiting.len() >= self.settings.max_waiting {
                return Err(LlmError::Busy(format!(
                    "{} requests already wait for this model; retry shortly",
                    st.waiting.len()
                )));
            }
            st.waiting.push_back(Pending { req, tx, cancel: cancel.clone(), kv_tokens });
            st.stats.waiting = st.waiting.len();
        }
        self.shared.wake.notify_one();
        Ok(Generation { rx, _on_drop: cancel.cancel_on_drop(), cancel })
    }

    /// Its counters now.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An admitted sequence.
struct Seq {
    p: Pending,
    cache: KvCache,
    kv_bytes: u64,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The last sampled token, fed at the next step.
    next: Option<Token>,
    /// Prompt and answer so far (for the repeat penalty).
    history: Vec<Token>,
    generated: usize,
    sampler: Sampler,
    text: TextStream,
    stop: StopFilter,
}

/// The step loop.
fn run(model: &GgufModel, settings: &Settings, shared: &Shared) {
    let mut active: Vec<Seq> = Vec::new();
    let mut kv_used = 0u64;
    // Tokens served per tenant, divided by its weight: the fair-share clock.
    let mut served: HashMap<Arc<str>, f64> = HashMap::new();
    let tok = &model.tokenizer;
    loop {
        {
            let mut st = shared.lock();
            while active.is_empty() && st.waiting.is_empty() && !st.shutdown {
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.shutdown {
                for p in st.waiting.drain(..) {
                    p.done(Finish::Cancelled, 0, None);
                }
                for s in active.drain(..) {
                    s.p.done(Finish::Cancelled, s.generated, None);
                }
                return;
            }
            st.waiting.retain(|p| match p.gone() {
                Some(finish) => {
                    p.done(finish, 0, None);
                    false
                }
                None => true,
            });
            // Admit, fairest tenant first. A tenant new to the engine starts at the lowest
            // clock of those present, so idling earns no credit.
            while active.len() < settings.max_sequences && !st.waiting.is_empty() {
                let floor = st
                    .waiting
                    .iter()
                    .filter_map(|p| served.get(p.req.tenant.name()))
                    .chain(active.iter().filter_map(|s| served.get(s.p.req.tenant.name())))
                    .fold(f64::INFINITY, |a, &b| a.min(b));
                let clock = |p: &Pending| {
                    served.get(p.req.tenant.name()).copied().unwrap_or(if floor.is_finite() { floor } else { 0.0 })
                };
                let Some(i) =
                    (0..st.waiting.len()).min_by(|&a, &b| clock(&st.waiting[a]).total_cmp(&clock(&st.waiting[b])))
                else {
                    break;
                };
                let start = clock(&st.waiting[i]);
                let need = KvCache::bytes_for(&model.llama.config, st.waiting[i].kv_tokens);
                if kv_used.saturating_add(need) > settings.kv_budget {
                    break; // waits for KV memory to free up
                }
                let Some(p) = st.waiting.remove(i) else { break };
                let cache = match model.llama.cache(p.kv_tokens) {
                    Ok(c) => c,
                    Err(e) => {
                        p.done(Finish::Error, 0, Some(e.message));
                        continue;
                    }
                };
                served.entry(p.req.tenant.name().into()).or_insert(start);
                kv_used += need;
                let sampler = Sampler::new(p.req.sampling.clone());
                let stop = StopFilter::new(p.req.stop.clone());
                active.push(Seq {
                    history: p.req.prompt.clone(),
                    p,
                    cache,
                    kv_bytes: need,
                    fed: 0,
                    next: None,
                    generated: 0,
                    sampler,
                    text: TextStream::default(),
                    stop,
                });
            }
            st.stats.waiting = st.waiting.len();
            st.stats.set_active(&active, kv_used);
        }
        let gone: Vec<Option<(Finish, Option<String>)>> =
            active.iter().map(|s| s.p.gone().map(|f| (f, None))).collect();
        if gone.iter().any(Option::is_some) {
            retire(&mut active, gone, &mut kv_used, shared, |_| {});
        }
        if active.is_empty() {
            continue;
        }

        // This step's tokens per sequence.
        let mut prefill_left = settings.prefill_chunk.max(1);
        let plan: Vec<(usize, usize, bool)> = active
            .iter()
            .map(|s| match s.next {
                Some(_) => (0, 1, true),
                None => {
                    let n = (s.p.req.prompt.len() - s.fed).min(prefill_left);
                    prefill_left -= n;
                    (s.fed, n, s.fed + n == s.p.req.prompt.len())
                }
            })
            .collect();
        let one: Vec<[Token; 1]> = active.iter().map(|s| [s.next.unwrap_or(0)]).collect();
        let start = Instant::now();
        let meter = Meter::with_budget(settings.step_memory);
        let result = {
            let mut steps: Vec<Step<'_>> = active
                .iter_mut()
                .zip(&plan)
                .zip(&one)
                .filter(|((_, (_, n, _)), _)| *n > 0)
                .map(|((s, &(from, n, logits)), one)| Step {
                    tokens: if s.next.is_some() { one.as_slice() } else { &s.p.req.prompt[from..from + n] },
                    cache: &mut s.cache,
                    logits,
                })
                .collect();
            model.llama.forward(&mut steps, &meter)
        };
        // Charge the step by tokens: its wall time on every core of the pool.
        let core_seconds = start.elapsed().as_secs_f64() * rayon::current_num_threads() as f64;
        let total: usize = plan.iter().map(|p| p.1).sum();
        for (s, &(_, n, _)) in active.iter().zip(&plan) {
            if n > 0 {
                let share = n as f64 / total.max(1) as f64;
                s.p.req.tenant.charge(core_seconds * share);
                *served.entry(s.p.req.tenant.name().into()).or_insert(0.0) += n as f64 / s.p.req.tenant.weight();
            }
        }
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let failed = active.iter().map(|_| Some((Finish::Error, Some(e.message.clone())))).collect();
                retire(&mut active, failed, &mut kv_used, shared, |_| {});
                continue;
            }
        };
        let mut logits = logits.into_iter();
        let mut finished: Vec<Option<(Finish, Option<String>)>> = vec![None; active.len()];
        let (mut generated, mut prefilled) = (0u64, 0u64);
        for ((s, &(_, n, wants)), done) in active.iter_mut().zip(&plan).zip(finished.iter_mut()) {
            if n == 0 {
                continue;
            }
            let l = logits.next().flatten();
            if s.next.is_none() {
                s.fed += n;
                prefilled += n as u64;
            }
            if !wants {
                continue;
            }
            let Some(l) = l else { continue };
            let token = s.sampler.sample(&l, &s.history);
            generated += 1;
            if tok.ends_turn(token) {
                flush(s, Finish::Stop, Vec::new());
                *done = Some((Finish::Stop, None));
                continue;
            }
            s.generated += 1;
            s.history.push(token);
            s.next = Some(token);
            let text = s.text.push(tok.token_bytes(token));
            let (emit, stopped) = s.stop.push(&text);
            if stopped {
                // What followed the stop string (in this token or held) is dropped.
                send_chunk(s, emit, vec![token]);
                *done = Some((Finish::Stop, None));
            } else if s.generated >= s.p.req.max_tokens || s.cache.len() >= s.cache.capacity() {
                send_chunk(s, emit, vec![token]);
                let reason = if s.generated >= s.p.req.max_tokens { Finish::Length } else { Finish::ContextFull };
                let tail = s.text.finish();
                let (mut rest, _) = s.stop.push(&tail);
                rest.push_str(&s.stop.finish());
                send_chunk(s, rest, Vec::new());
                flush(s, reason, Vec::new());
                *done = Some((reason, None));
            } else {
                send_chunk(s, emit, vec![token]);
            }
        }
        let batched = plan.iter().filter(|p| p.1 > 0).count() as u64;
        retire(&mut active, finished, &mut kv_used, shared, |stats| {
            stats.steps += 1;
            stats.batched += batched;
            stats.generated += generated;
            stats.prefilled += prefilled;
        });
    }
}

/// Takes the sequences with an end in `ends` (one entry per active sequence) out of the batch,
/// publishes the stats (with `update`), and only then sends their `Done`: whoever sees a
/// generation end sees its slot and KV cache already freed.
fn retire(
    active: &mut Vec<Seq>,
    ends: Vec<Option<(Finish, Option<String>)>>,
    kv_used: &mut u64,
    shared: &Shared,
    update: impl FnOnce(&mut Stats),
) {
    debug_assert_eq!(active.len(), ends.len());
    let mut ended = Vec::new();
    let mut kept = Vec::with_capacity(active.len());
    for (s, end) in active.drain(..).zip(ends) {
        match end {
            Some(end) => {
                *kv_used -= s.kv_bytes;
                ended.push((s, end));
            }
            None => kept.push(s),
        }
    }
    *active = kept;
    {
        let mut st = shared.lock();
        update(&mut st.stats);
        st.stats.set_active(active, *kv_used);
    }
    for (s, (finish, error)) in ended {
        s.p.done(finish, s.generated, error);
    }
}

fn send_chunk(s: &Seq, text: String, tokens: Vec<Token>) {
    if !text.is_empty() || !tokens.is_empty() {
        let _ = s.p.tx.send(Event::Chunk { text, tokens });
    }
}

/// Flushes the text `s` holds back before it ends with `reason` (when the model stopped on
/// its own); its `Done` follows from [`retire`].
fn flush(s: &mut Seq, reason: Finish, tokens: Vec<Token>) {
    if reason == Finish::Stop {
        let tail = s.text.finish();
        let (mut rest, stopped) = s.stop.push(&tail);
        if !stopped {
            rest.push_str(&s.stop.finish());
        }
        send_chunk(s, rest, tokens);
    }
}

/// Holds back text that may be the start of a stop string, and cuts the answer at one.
struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    fn new(stops: Vec<String>) -> StopFilter {
        StopFilter { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds text; returns what may be shown now, and whether a stop string appeared (the
    /// text before it is returned; the rest is dropped).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of `held` that begins some stop string stays held.
        let keep = (1..=self.held.len())
            .rev()
            .filter(|&k| self.held.is_char_boundary(self.held.len() - k))
            .find(|&k| {
                let tail = &self.held[self.held.len() - k..];
                self.stops.iter().any(|s| s.len() > k && s.starts_with(tail))
            })
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// What is held at the end (no stop string completed).
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let mut f = StopFilter::new(vec!["\nUser:".into(), "END".into()]);
        assert_eq!(f.push("Hello"), ("Hello".into(), false));
        assert_eq!(f.push(" wor\nUs"), (" wor".into(), false));
        assert_eq!(f.push("ually"), ("\nUsually".into(), false));
        assert_eq!(f.push("E"), ("".into(), false));
        assert_eq!(f.push("NDING"), ("".into(), true));
        let mut f = StopFilter::new(vec!["é!".into()]);
        assert_eq!(f.push("café"), ("caf".into(), false));
        assert_eq!(f.finish(), "é");
        let mut none = StopFilter::new(vec![String::new()]);
        assert_eq!(none.push("abc"), ("abc".into(), false));
    }
}
