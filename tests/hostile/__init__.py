"""Hostile inputs: property-based fuzzing of everything facefl reads from outside the process.

Each module takes a valid artefact (configuration, split manifest, safetensors checkpoint, MOTE
gallery, CKKS ciphertexts and key contexts, npz archive, data set trees, Flower payloads), damages
it the way an attacker, a flipped bit or an interrupted copy would, and checks three properties:

* the reader returns a valid object or raises the module's documented error (ConfigError,
  ValueError and its subclasses CiphertextError / HEKeyError / SampleError, FileNotFoundError):
  never a crash (segfault, MemoryError, AttributeError, RecursionError, ...);
* the message names the file, key or client at fault;
* nothing is left behind: a failed read leaves its directory as it was, an interrupted write
  leaves neither the file nor a temporary file, and ``facefl run`` with a bad configuration
  creates no run directory.

Examples are derandomised and no example database is kept, so every run (and CI) tries the same
inputs; the whole package takes well under a minute on one core.
"""
