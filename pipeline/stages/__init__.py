"""The stages of a build, one module each: find the checkpoint, map it onto the canonical
layout, export, verify, compile (transform, deploy, combine), quality."""
