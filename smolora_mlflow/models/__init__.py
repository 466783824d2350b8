"""Models: locating and loading base models (:mod:`.pretrained`), the weights hash and the verified folder
(:mod:`.hashing`, :mod:`.verified`), the manifest digest (:mod:`.manifest`), the integrity gate every load
goes through and its checks (:mod:`.integrity`, :mod:`.folder_checks`), adapters (:mod:`.adapters`),
generation (:mod:`.generation`) and the built-in demo model (:mod:`.demo`).

The modules are imported by their full names; this package re-exports nothing, so importing one of them
never loads torch for the others.
"""
