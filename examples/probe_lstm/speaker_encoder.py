"""Stands in for a pretrained speaker encoder from your own package: a 3-layer LSTM over log-mel frames and a
linear embedding of the top layer's final state. Nothing here knows about probing."""

import torch


class SpeakerEncoder(torch.nn.Module):
    def __init__(self, n_mels: int = 16, hidden: int = 64, emb: int = 32):
        super().__init__()
        self.lstm = torch.nn.LSTM(n_mels, hidden, num_layers=3, batch_first=True)
        self.embed = torch.nn.Linear(hidden, emb)

    def forward(self, frames):  # a PackedSequence of (T_i, n_mels), or a padded (B, T, n_mels)
        _, (h_n, _) = self.lstm(frames)  # h_n: (3, B, hidden)
        return self.embed(h_n[-1])  # (B, emb)
