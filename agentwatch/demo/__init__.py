"""``agentwatch demo``: the first thing to run after installing, and a test of the whole chain.

It starts a private Redis server and the real detector worker, runs a small fleet of real agent
processes that use the producer, breaks three of them in the three ways agentwatch exists to
catch (a memory climb ending in SIGKILL, a socket call that never returns, a token runaway),
shows each alert as it fires with its time-to-detect, and removes everything it started.

Modules: ``plan`` (timings, agents, the pipeline file), ``agents`` (the agent program),
``fleet`` (agent processes, the silent server), ``scenario`` (the run), ``outcome`` (what
counts as caught), ``report`` (the console output). Importing this package imports nothing
else: ``python -m agentwatch.demo.agents`` must stay as light as a user's agent.
"""
