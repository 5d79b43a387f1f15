// The llama.cpp side of `scripts/bench.sh llm`: node-llama-cpp 3.21.1's prebuilt CPU binary on
// the same GGUF, the same prompts and threads as EIR's side. Prints one JSON object.
// argv: GGUF path, JSON file {chat: [ids], long: [ids], prompts: [[ids] x 8], decode: N, threads: T}
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH ?? ".", "x.js"));
const { getLlama } = await import(require.resolve("node-llama-cpp"));
const [modelPath, inputPath] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputPath, "utf8"));
const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath });
const threads = input.threads;
const now = () => Number(process.hrtime.bigint()) / 1e9;

async function single(ids, n) {
  const ctx = await model.createContext({ contextSize: 1024, batchSize: 512, threads, flashAttention: false });
  const seq = ctx.getSequence();
  const t0 = now();
  let first = 0, count = 0;
  for await (const tok of seq.evaluate(ids, { temperature: 0 })) {
    if (count === 0) first = now();
    if (++count === n) break;
  }
  const end = now();
  await ctx.dispose();
  return { ttft_s: first - t0, decode_tok_s: (n - 1) / (end - first) };
}

async function prefill(ids) {
  const ctx = await model.createContext({ contextSize: 1024, batchSize: 512, threads, flashAttention: false });
  const seq = ctx.getSequence();
  const t0 = now();
  await seq.evaluateWithoutGeneratingNewTokens(ids);
  const s = now() - t0;
  await ctx.dispose();
  return { prefill_tok_s: ids.length / s };
}

async function concurrent(prompts, n) {
  const ctx = await model.createContext({ contextSize: 1024 * prompts.length, sequences: prompts.length, batchSize: 512, threads, flashAttention: false });
  const t0 = now();
  const firsts = [];
  const texts = await Promise.all(prompts.map(async (ids, i) => {
    const seq = ctx.getSequence();
    const out = [];
    for await (const tok of seq.evaluate(ids, { temperature: 0 })) {
      if (out.length === 0) firsts.push(now() - t0);
      out.push(tok);
      if (out.length === n) break;
    }
    return out;
  }));
  const s = now() - t0;
  await ctx.dispose();
  return { aggregate_tok_s: (n * prompts.length) / s, mean_ttft_s: firsts.reduce((a, b) => a + b, 0) / firsts.length, tokens: texts };
}

const out = { version: "node-llama-cpp 3.21.1" };
Object.assign(out, await single(input.chat, input.decode));
Object.assign(out, await prefill(input.long));
const c = await concurrent(input.prompts, input.decode);
out.concurrent = { aggregate_tok_s: c.aggregate_tok_s, mean_ttft_s: c.mean_ttft_s };
const alone = [];
for (const ids of input.prompts) {
  const ctx = await model.createContext({ contextSize: 1024, batchSize: 512, threads, flashAttention: false });
  const seq = ctx.getSequence();
  const o = [];
  for await (const tok of seq.evaluate(ids, { temperature: 0 })) { o.push(tok); if (o.length === input.decode) break; }
  await ctx.dispose();
  alone.push(o);
}
out.concurrent.identical_to_single = c.tokens.filter((t, i) => JSON.stringify(t) === JSON.stringify(alone[i])).length;
console.log(JSON.stringify(out));
await model.dispose();
