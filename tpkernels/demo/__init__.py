"""The seed notebook's question, demonstrated on real ranks (`python -m tpkernels`): not the library's API.

`strategies`: the notebook's cells and four strategies for the MLP, run by each spawned rank; `model_table`:
the performance model's table (`python -m tpkernels model`).
"""
