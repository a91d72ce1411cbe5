// libFuzzer target for the safetensors reader: any byte string either parses into a file whose every
// floating tensor loads and whose re-serialisation parses back to the same entries, or raises
// io::format_error. Anything else — a crash, a sanitizer report, another exception — is a bug.
//
//   ./run.sh fuzz [seconds]
#include <tensor_adapters/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace io = tensor_adapters::io;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  io::safetensors_file f;
  try {
    f = io::safetensors_file::parse(data, size, "fuzz input");
  } catch (const io::format_error&) {
    return 0;
  }
  io::safetensors_writer w;
  for (const auto& [key, value] : f.metadata()) w.set_metadata(key, value);
  for (const io::tensor_info& t : f.tensors()) {
    if (io::is_floating(t.type)) {
      const std::vector<double> d = f.load_values<double>(t.name);
      const std::vector<float> s = f.load_values<float>(t.name);
      if (d.size() != static_cast<std::size_t>(t.size()) || s.size() != d.size()) std::abort();
    }
    w.add_raw(t.name, t.type, t.shape, f.raw(t), static_cast<std::size_t>(t.end - t.begin));
  }
  const std::vector<unsigned char> again = w.serialize();
  const io::safetensors_file g = io::safetensors_file::parse(again.data(), again.size(), "re-serialised");
  if (g.tensors().size() != f.tensors().size() || g.metadata() != f.metadata()) std::abort();
  for (const io::tensor_info& t : f.tensors()) {
    const io::tensor_info& u = g.info(t.name);
    if (u.type != t.type || u.shape != t.shape || u.end - u.begin != t.end - t.begin) std::abort();
    for (std::uint64_t i = 0; i < t.end - t.begin; ++i)
      if (g.raw(u)[i] != f.raw(t)[i]) std::abort();
  }
  return 0;
}
