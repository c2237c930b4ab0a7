"""MiniGPT's pipeline after the model and the tokenizer, one folder per stage, in the order a run meets them:

    data/        text -> training examples and batches
                 windows (pretraining: documents -> tokens -> splits -> sliding windows), instructions
                 (Alpaca records -> ids + the one loss mask), preferences (chosen/rejected pairs), labels
                 (classification records), tasks (embedded tasks whose answers a program checks), collate
    evaluation/  metrics (loss, perplexity, bits per byte, bootstrap intervals, exact match, accuracy)
                 and the one batched greedy generator
    saved/       what a run leaves on disk: the run folder's layout, saved model folders (load safely,
                 save atomically), the model card, figures, the push to the Hub
    run/         what every job shares: the lifecycle (open -> prepare -> evaluate before -> train ->
                 finish), the arguments, optimizers, the Accelerator, the loop, the schedule, checkpoints,
                 the run folder's lock, distributed sharding, LoRA
    jobs/        one module per job: pretrain, sft, dpo, classify, evaluate
    cli.py       YAML/JSON + flags -> dataclasses; one `error: ...` line for bad input

Dependencies run up this list: a job imports run, saved, evaluation and data; run imports saved and
evaluation; evaluation imports data; saved and data import no other stage. Nothing imports a job,
and no job imports another.
"""
