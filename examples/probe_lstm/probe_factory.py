"""The whole user-side code to probe the encoder per layer, with h_n and packed batches (probe.yaml)."""

import torch
from speaker_encoder import SpeakerEncoder  # found next to probe.yaml: no PYTHONPATH needed

from stethoscope.probe import ModelInputs, ProbeAdapter
from stethoscope.probe.audio import LogMel


def make(sample_rate, checkpoint=None):
    torch.manual_seed(0)  # no checkpoint: seeded weights stand in for pretrained ones
    model = SpeakerEncoder()
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint))
    logmel = LogMel(sample_rate, n_mels=16)

    def preprocess(items):
        frames = [logmel(torch.from_numpy(it.audio)[None])[0] for it in items]  # (T_i, 16) each
        return ModelInputs(args=(torch.nn.utils.rnn.pack_sequence(frames, enforce_sorted=False),))

    return ProbeAdapter(model, preprocess)
