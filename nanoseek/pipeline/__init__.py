"""The R1 pipeline's commands beside `nanoseek rl` and `nanoseek sft`: `nanoseek eval` (pass@1, pass@k,
format and reflection rates, locally or against any OpenAI-compatible server) and `nanoseek sample`
(rejection sampling into an SFT-ready JSONL). See docs/pipeline.md."""
