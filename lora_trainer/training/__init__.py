"""The parts of "Train", one concern per module; `lora_trainer.train.train` puts them in order.

hardware   option pairs the machine cannot run, refused before any weight is loaded
memory     what a run holds on the GPU before activations, counted from file headers; too much is refused
peak       the run's predicted peak GPU memory, kept per model and settings; too much is refused
fakestep   the run's phases and one training step on fake tensors, counted byte by byte
livebytes  the counter of live and peak bytes that prediction uses
parts      the working model's UNet, VAE, text encoder, tokenizer and noise schedule
adapters   LoRA injection (or a full fine-tune) and what the optimizer trains
batches    the data loader: pictures, or latents cached once with the VAE moved off the GPU
loss       noise, targets (epsilon / v-prediction), min-SNR and prior-preservation loss
optim      AdamW (8-bit with bitsandbytes) and the learning-rate schedule
loop       the step loop: accumulate, step, report, save, sample, cancel
console    the tqdm bar and the Progress reports
samples    preview pictures drawn with the model being trained
outputs    LoRA file names, saving, the model's info (revision, lifetime steps)
snapshots  saving during and at the end of a run, in a safe order
resume     the state a later run continues from, kept in the model folder
"""
