// libFuzzer target for the PEFT adapter_config.json parser: any byte string either parses into a config
// whose values are in range and whose re-serialisation (peft_lora_config_json) parses back to the same
// config, or raises io::format_error. Anything else — a crash, a sanitizer report, another exception, a
// hang — is a bug.
//
//   ./run.sh fuzz [seconds]
#include <tensor_adapters/io/peft.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace io = tensor_adapters::io;

namespace {

bool same(const io::peft_lora_config& a, const io::peft_lora_config& b) {
  return a.r == b.r && a.lora_alpha == b.lora_alpha && a.use_rslora == b.use_rslora &&
         a.target_modules == b.target_modules && a.target_modules_regex == b.target_modules_regex &&
         a.rank_pattern == b.rank_pattern && a.alpha_pattern == b.alpha_pattern;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  io::peft_lora_config c;
  try {
    c = io::parse_peft_lora_config(text, "fuzz input");
  } catch (const io::format_error&) {
    return 0;
  }
  if (c.r < 1 || !std::isfinite(c.lora_alpha)) std::abort();
  for (const auto& kv : c.rank_pattern)
    if (kv.second < 1) std::abort();
  for (const auto& kv : c.alpha_pattern)
    if (!std::isfinite(kv.second)) std::abort();
  // What the library writes for an accepted config must read back as the same config.
  const std::string again = io::peft_lora_config_json(c);
  const io::peft_lora_config d = io::parse_peft_lora_config(again, "re-serialised config");
  if (!same(c, d)) std::abort();
  return 0;
}
