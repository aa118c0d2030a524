"""Layer probing: does a layer separate an attribute, without leaking another, robustly across texts?"""
