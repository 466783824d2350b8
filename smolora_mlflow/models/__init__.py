"""Models: locating and loading base models (:mod:`.pretrained`), the weights hash and the verified folder
(:mod:`.hashing`, :mod:`.verified`), the manifest digest (:mod:`.manifest`), adapters (:mod:`.adapters`),
generation (:mod:`.generation`) and the built-in demo model (:mod:`.demo`).

The modules are imported by their full names; this package re-exports nothing, so importing one of them
never loads torch for the others.
"""
