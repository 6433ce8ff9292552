"""`evsam-export bench DIR`: honest latency, throughput, memory and load time of every artifact.

Method: every subject is loaded first, warm-up runs are discarded, then repetitions are *alternated*
across subjects (A B C A B C ...) inside one process, so machine noise hits all of them alike; we report
median, p90 and min, and compare subjects as ratios. Baselines in the same run: PyTorch eager fp32 and a
*plain* export (torch.onnx.export at opset 17, no graph work: what the official export script produces).
Prompt latency as an app waits for it (`Predictor.predict`: decoder and host post-processing) is timed
against the plain export of upstream's decoder alone, on the same embeddings and prompts (`prompt_bench`).
Peak resident memory is measured in a separate process per subject (load + one inference).
A subject with `timed_run_ms(feeds)` (the browser runner) reports its own time, measured where it runs (in
the page: onnxruntime-web's `session.run`, no transfer to Python), with its threads in the Timing's note.

Modules: `timing` (feeds, alternation, summaries, peak memory), `baselines` (the plain exports), `run` (the
bench run and the prompt latency), `tables` (table, chart, result rows), `app` (the web app in a browser).
"""
