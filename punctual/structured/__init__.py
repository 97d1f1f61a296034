"""Structured output: constrain decoding to a JSON schema, regex, choice list or grammar (llguidance).

spec.py      what a request asks for (pure Python: travels in SamplingParams)
grammar.py   a spec -> llguidance grammar text
compiler.py  grammar text -> a ready matcher, off the step loop, cached, with a timeout
guide.py     the runner-side matchers: masks for the rows that need them, advance and roll back
"""
