"""Supervised fine-tuning (`nanoseek sft`): chat data -> assistant-masked tokens -> packed rows with
document-causal attention -> the trainer's split step. See docs/sft.md.

    data.py      JSONL formats, chat-template rendering, the assistant mask, packing/padding, the loader
    masking.py   document-causal attention, swapped into the model from outside (model/swap.py)
    loss.py      the SFT loss_fn for train/step.py's accumulate_gradients
    config.py    SFTConfig and the command line
    loop.py      the run: model from a checkpoint or a fresh preset, steps, checkpoints, exact resume
"""
