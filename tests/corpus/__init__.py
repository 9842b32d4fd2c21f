"""Survey corpus and fault matrix (issue 13): generators of odd exports, broken inputs and
interrupted runs, and the harness that runs the CLI over them (docs/reliability.md).

    variants   small CNNs spelled as exporters spell them (IR, opset, weights, layout...)
    images     tiny PNG folders, label masks and class folders
    survey     every verb on one variant, and the variants x verbs table
    broken     broken model files, images, masks, plans and scores files
    faults     the fault matrix: each broken input given to every verb that reads it
    interrupt  kill -9 at random moments, then --resume, compared bit for bit

`.venv/bin/python tests/corpus` prints the tables.
"""
