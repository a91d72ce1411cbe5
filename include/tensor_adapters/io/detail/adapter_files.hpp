// Helpers shared by the adapter file formats (io/peft.hpp, io/glora_file.hpp, io/flora_file.hpp): text
// files, JSON fields, regular expressions and the adapter directory layout. Internal: the public names
// live in those headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "../safetensors.hpp"

namespace tensor_adapters::io {

// The two files of an adapter directory, as PEFT names them.
inline const std::string adapter_config_file = "adapter_config.json";
inline const std::string adapter_model_file = "adapter_model.safetensors";

namespace detail {

inline std::regex compile_pattern(const std::string& regex, const std::string& what) {
  try {
    return std::regex(regex, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw format_error(what + ": \"" + regex + "\" is not a valid regular expression (" + e.what() + ")");
  }
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error(path + ": cannot open the file");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) throw format_error(path + ": cannot read the file");
  return s.str();
}

inline void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw format_error(path + ": cannot open the file for writing");
  out << text;
  out.close();
  if (!out) throw format_error(path + ": writing the file failed");
}

// Integral values as JSON integers (as Python's json writes 8 rather than 8.0), others as numbers.
inline void json_number(nlohmann::ordered_json& j, const std::string& key, double v) {
  if (v == std::floor(v) && std::fabs(v) < 9.0e15) j[key] = static_cast<std::int64_t>(v);
  else j[key] = v;
}

// A field of a config object; nullptr when absent or null.
inline const nlohmann::ordered_json* json_field(const nlohmann::ordered_json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

// The config's "peft_type" must be `expected` (when present, or always when `required`).
inline void check_peft_type(const nlohmann::ordered_json& j, const std::string& expected, bool required,
                            const std::string& name) {
  const nlohmann::ordered_json* p = json_field(j, "peft_type");
  if (!p && required) throw format_error(name + ": \"peft_type\" is missing; expected \"" + expected + "\"");
  if (p && (!p->is_string() || p->get<std::string>() != expected))
    throw format_error(name + ": peft_type is " + p->dump() + ", not \"" + expected + "\"");
}

// "target_modules": a list of names (into `list`) or a regular expression (into `regex`); absent or null
// leaves both empty.
inline void parse_target_modules(const nlohmann::ordered_json& j, const std::string& name,
                                 std::vector<std::string>& list, std::string& regex) {
  const nlohmann::ordered_json* p = json_field(j, "target_modules");
  if (!p) return;
  if (p->is_string()) {
    regex = p->get<std::string>();
    if (regex.empty()) throw format_error(name + ": \"target_modules\" is an empty string");
    if (regex != "all-linear") compile_pattern(regex, name + " target_modules");
  } else if (p->is_array()) {
    for (const auto& t : *p) {
      if (!t.is_string()) throw format_error(name + ": \"target_modules\" holds " + t.dump() + ", not a string");
      list.push_back(t.get<std::string>());
    }
  } else {
    throw format_error(name + ": \"target_modules\" must be a list of names or a regular expression");
  }
}

inline void json_target_modules(nlohmann::ordered_json& j, const std::vector<std::string>& list,
                                const std::string& regex) {
  if (!regex.empty()) j["target_modules"] = regex;
  else if (!list.empty()) j["target_modules"] = list;
  else j["target_modules"] = nullptr;
}

// Π shape (1 for a scalar).
inline index element_count(const std::vector<index>& shape) {
  index n = 1;
  for (index d : shape) n *= d;
  return n;
}

// The problems found in one file, one per key or module: loaders check every module and then report
// all of them in one format_error, one problem per line.
class problem_list {
 public:
  // Runs `body`; a format_error it throws becomes one problem.
  template <class Body>
  void check(Body&& body) {
    try {
      body();
    } catch (const format_error& e) {
      add(e.what());
    }
  }
  void add(const std::string& problem) { problems_.push_back(problem); }
  bool empty() const { return problems_.empty(); }

  // Throws format_error holding every problem, one per line, if there is any.
  void throw_if_any() const {
    if (problems_.empty()) return;
    std::string text;
    for (const std::string& p : problems_) text += (text.empty() ? "" : "\n") + p;
    throw format_error(text);
  }

 private:
  std::vector<std::string> problems_;
};

// Writes an adapter directory: creates `directory` if needed, then the tensors and the config text.
inline void write_adapter_directory(const std::string& directory, const safetensors_writer& tensors,
                                    const std::string& config_json) {
  const std::filesystem::path dir(directory);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw format_error(directory + ": cannot create the directory (" + ec.message() + ")");
  tensors.write((dir / adapter_model_file).string());
  write_text_file((dir / adapter_config_file).string(), config_json);
}

}  // namespace detail
}  // namespace tensor_adapters::io
