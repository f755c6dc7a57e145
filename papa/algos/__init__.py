"""Preference-alignment methods. Each is a small loss over a flat work list of (sample, timestep) items; the round
engine (`papa.engine`) does sampling, feedback, chunking, distribution, evaluation and records."""
