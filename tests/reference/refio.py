"""Writes reference tensors in the text format that tests/reference.hpp reads.

A file is a sequence of records, one tensor each:

    tensor <name> <rank> <d0> ... <d(rank-1)>
    <v0> <v1> ... (row-major, float64 printed with 17 significant digits, one line)

Lines starting with '#' are comments. Names are unique within a file.
"""

import torch


class Writer:
    def __init__(self, path, comment=""):
        self.path = path
        self.names = set()
        self.lines = []
        for line in comment.splitlines():
            self.lines.append("# " + line)

    def add(self, name, t):
        assert name not in self.names, name
        self.names.add(name)
        t = torch.as_tensor(t).detach().to(torch.float64).contiguous()
        dims = list(t.shape)
        self.lines.append(("tensor %s %d %s" % (name, len(dims), " ".join(str(d) for d in dims))).rstrip())
        self.lines.append(" ".join("%.17g" % v for v in t.reshape(-1).tolist()))

    def close(self):
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
