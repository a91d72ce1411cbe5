// Reads the reference tensors written by tests/reference/refio.py (PyTorch-generated expected values).
#pragma once

#include <tensor_adapters/tensor.hpp>

#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace reference {

struct record {
  std::vector<tensor_adapters::index> dims;
  std::vector<double> values;
};

class file {
 public:
  // path is relative to tests/reference/.
  explicit file(const std::string& path) {
    const std::string full = std::string(TA_REFERENCE_DIR) + "/" + path;
    std::ifstream in(full);
    if (!in) throw std::runtime_error("cannot open reference file " + full);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream head(line);
      std::string word, name;
      int rank = 0;
      head >> word >> name >> rank;
      if (word != "tensor") throw std::runtime_error("malformed reference file " + full + ": " + line);
      record r;
      r.dims.resize(static_cast<std::size_t>(rank));
      tensor_adapters::index size = 1;
      for (auto& d : r.dims) head >> d, size *= d;
      std::getline(in, line);
      std::istringstream body(line);
      r.values.resize(static_cast<std::size_t>(size));
      for (auto& v : r.values) body >> v;
      if (!body) throw std::runtime_error("short record " + name + " in " + full);
      records_[name] = std::move(r);
    }
  }

  bool has(const std::string& name) const { return records_.count(name) != 0; }

  // The record as a tensor of type T and rank N; throws if it is missing or of another rank.
  template <class T, int N>
  tensor_adapters::tensor<T, N> get(const std::string& name) const {
    auto it = records_.find(name);
    if (it == records_.end()) throw std::runtime_error("no reference tensor " + name);
    const record& r = it->second;
    if (static_cast<int>(r.dims.size()) != N) throw std::runtime_error("reference tensor " + name + " has another rank");
    Eigen::DSizes<tensor_adapters::index, N> dims;
    for (int d = 0; d < N; ++d) dims[d] = r.dims[static_cast<std::size_t>(d)];
    tensor_adapters::tensor<T, N> t(dims);
    for (std::size_t i = 0; i < r.values.size(); ++i) t.data()[i] = static_cast<T>(r.values[i]);
    return t;
  }

  // A one-element record (of any rank) as a number.
  double scalar(const std::string& name) const {
    auto it = records_.find(name);
    if (it == records_.end() || it->second.values.size() != 1) throw std::runtime_error("no reference scalar " + name);
    return it->second.values[0];
  }

 private:
  std::map<std::string, record> records_;
};

}  // namespace reference
