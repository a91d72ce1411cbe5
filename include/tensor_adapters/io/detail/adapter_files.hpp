// Helpers shared by the adapter file formats (io/peft.hpp, io/glora_file.hpp, io/flora_file.hpp): text
// files, JSON fields, regular expressions and the adapter directory layout. Internal: the public names
// live in those headers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "../safetensors.hpp"

namespace tensor_adapters::io {

// The two files of an adapter directory, as PEFT names them.
inline const std::string adapter_config_file = "adapter_config.json";
inline const std::string adapter_model_file = "adapter_model.safetensors";

// Limits on the regular expressions an adapter config hands to std::regex (target_modules as a string,
// rank_pattern and alpha_pattern keys) and on the module names matched against them. They keep
// compiling and matching a pattern from a file bounded in time and stack depth; a pattern or name beyond
// them raises format_error. Real PEFT patterns are a few dozen characters with no counted repetition.
inline constexpr std::size_t max_pattern_length = 1000;      // characters in a pattern
inline constexpr std::size_t max_pattern_depth = 32;         // nested groups ( … )
inline constexpr std::size_t max_pattern_digits = 6;         // digits in a repetition count {n,m}
inline constexpr std::uint64_t max_pattern_states = 4000;    // size estimate with counted repetitions expanded
inline constexpr std::uint64_t max_pattern_lookahead = 64;   // the same, summed over lookaheads (?= … ) (?! … )
inline constexpr std::uint64_t max_pattern_lookaheads = 2;   // lookaheads, counted repetitions expanded
inline constexpr std::size_t max_module_name_length = 1000;  // characters in a module name matched

namespace detail {

inline std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) {
  return a > std::numeric_limits<std::uint64_t>::max() - b ? std::numeric_limits<std::uint64_t>::max() : a + b;
}

inline std::uint64_t saturating_mul(std::uint64_t a, std::uint64_t b) {
  return a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a ? std::numeric_limits<std::uint64_t>::max()
                                                                     : a * b;
}

// `text` quoted for a message, cut to about 60 bytes.
inline std::string quoted_excerpt(const std::string& text) { return "\"" + excerpt(text, 60) + "\""; }

// Checks an ECMAScript pattern against the limits above before std::regex sees it: its length, the
// nesting of its groups, the digits of its repetition counts, back-references (refused: matching stays
// polynomial only without them), lookaheads nested in lookaheads (refused), and an estimate of its
// size in automaton states with every counted repetition x{n,m} expanded to max(n, m) + 1 copies of x
// (and the same estimate over the lookaheads alone). It does not decide validity; std::regex does.
// Throws format_error naming `what` and the pattern.
inline void check_pattern(const std::string& re, const std::string& what) {
  auto fail = [&](const std::string& why) -> void {
    throw format_error(what + ": the pattern " + quoted_excerpt(re) + " " + why);
  };
  if (re.size() > max_pattern_length)
    fail("has " + std::to_string(re.size()) + " characters; patterns are limited to " +
         std::to_string(max_pattern_length));
  // One entry per open group: its size so far, the size of its last atom (what a quantifier repeats),
  // and the same two counts for the lookaheads within it and for their number.
  struct group {
    std::uint64_t size = 0, last = 0, look = 0, last_look = 0, looks = 0, last_looks = 0;
    bool lookahead = false;
  };
  std::vector<group> open(1);
  bool in_lookahead = false;
  const std::size_t n = re.size();
  auto atom = [&](std::uint64_t size, std::uint64_t look, std::uint64_t looks) {
    group& g = open.back();
    g.size = saturating_add(g.size, size);
    g.look = saturating_add(g.look, look);
    g.looks = saturating_add(g.looks, looks);
    g.last = size;
    g.last_look = look;
    g.last_looks = looks;
  };
  auto no_backreference = [&](std::size_t i) {  // re[i] is a backslash
    if (i + 1 < n && re[i + 1] >= '1' && re[i + 1] <= '9')
      fail("holds the back-reference \\" + std::string(1, re[i + 1]) + "; back-references are not supported");
  };
  auto is_digit = [&](std::size_t i) { return i < n && re[i] >= '0' && re[i] <= '9'; };
  auto count = [&](std::size_t& i) -> std::uint64_t {  // a run of digits at i; i moves past it
    std::uint64_t v = 0;
    for (std::size_t start = i; is_digit(i); ++i) {
      if (i - start == max_pattern_digits)
        fail("holds a repetition count of more than " + std::to_string(max_pattern_digits) + " digits");
      v = v * 10 + static_cast<std::uint64_t>(re[i] - '0');
    }
    return v;
  };
  for (std::size_t i = 0; i < n;) {
    const char c = re[i];
    if (c == '\\') {
      no_backreference(i);
      i += 2;
      atom(1, 0, 0);
    } else if (c == '[') {  // a bracket expression: one atom
      ++i;
      if (i < n && re[i] == '^') ++i;
      while (i < n && re[i] != ']') {
        if (re[i] == '\\') {
          no_backreference(i);
          i += 2;
        } else if (re[i] == '[' && i + 1 < n && (re[i + 1] == ':' || re[i + 1] == '.' || re[i + 1] == '=')) {
          const std::size_t close = re.find(std::string(1, re[i + 1]) + "]", i + 2);
          i = close == std::string::npos ? n : close + 2;
        } else {
          ++i;
        }
      }
      ++i;
      atom(1, 0, 0);
    } else if (c == '(') {
      if (open.size() > max_pattern_depth)
        fail("nests groups more than " + std::to_string(max_pattern_depth) + " deep");
      const bool lookahead = re.compare(i, 3, "(?=") == 0 || re.compare(i, 3, "(?!") == 0;
      if (lookahead && in_lookahead) fail("nests a lookahead in a lookahead");
      in_lookahead = in_lookahead || lookahead;
      group g;
      g.lookahead = lookahead;
      open.push_back(g);
      i += lookahead || re.compare(i, 3, "(?:") == 0 ? 3 : 1;
    } else if (c == ')' && open.size() > 1) {
      const group g = open.back();
      open.pop_back();
      if (g.lookahead) in_lookahead = false;
      const std::uint64_t size = saturating_add(g.size, 2);
      atom(size, g.lookahead ? size : g.look, g.lookahead ? 1 : g.looks);
      ++i;
    } else if (c == '*' || c == '+' || c == '?' || c == '|') {
      atom(2, 0, 0);
      open.back().last = 0;
      ++i;
    } else if (c == '{') {  // x{n}, x{n,}, x{n,m}: max(n, m) + 1 copies of x in all
      ++i;
      std::uint64_t copies = count(i);
      if (i < n && re[i] == ',') {
        ++i;
        copies = std::max(copies, count(i));
      }
      copies = saturating_add(copies, 1);
      group& g = open.back();
      g.size = saturating_add(g.size, saturating_mul(g.last, copies - 1));
      g.look = saturating_add(g.look, saturating_mul(g.last_look, copies - 1));
      g.looks = saturating_add(g.looks, saturating_mul(g.last_looks, copies - 1));
      g.last = g.last_look = g.last_looks = 0;
      if (i < n && re[i] == '}') ++i;
    } else {
      atom(1, 0, 0);
      ++i;
    }
  }
  while (open.size() > 1) {  // unclosed groups (std::regex refuses them): counted all the same
    const group g = open.back();
    open.pop_back();
    atom(g.size, g.look, g.looks);
  }
  if (open[0].size > max_pattern_states)
    fail("is too large: with its counted repetitions expanded it has about " +
         (open[0].size == std::numeric_limits<std::uint64_t>::max() ? std::string("2^64")
                                                                    : std::to_string(open[0].size)) +
         " automaton states; the limit is " + std::to_string(max_pattern_states));
  if (open[0].looks > max_pattern_lookaheads)
    fail("has more than " + std::to_string(max_pattern_lookaheads) +
         " lookaheads (?= … ) or (?! … ), counting each copy a repetition {n,m} makes");
  if (open[0].look > max_pattern_lookahead)
    fail("has lookaheads too large: with counted repetitions expanded they have about " +
         std::to_string(open[0].look) + " automaton states; the limit is " + std::to_string(max_pattern_lookahead));
}

// Compiles an ECMAScript pattern (compile_pattern: after check_pattern). With libstdc++ the pattern is compiled for its
// polynomial-time matcher (a breadth-first simulation of the automaton) rather than its backtracking one,
// so no pattern within the limits can take exponential time or recurse once per character of the name.
inline std::regex compile_checked_pattern(const std::string& regex, const std::string& what) {
  std::regex::flag_type flags = std::regex::ECMAScript;
#if defined(__GLIBCXX__)
  flags |= std::regex_constants::__polynomial;
#endif
  try {
    return std::regex(regex, flags);
  } catch (const std::regex_error& e) {
    throw format_error(what + ": " + quoted_excerpt(regex) + " is not a valid regular expression (" + e.what() +
                       ")");
  }
}

inline std::regex compile_pattern(const std::string& regex, const std::string& what) {
  check_pattern(regex, what);
  return compile_checked_pattern(regex, what);
}

// PEFT's rank_pattern / alpha_pattern rule for a key: the key checked, then (.*\.)?(key) compiled.
inline std::regex compile_peft_key(const std::string& key, const std::string& what) {
  check_pattern(key, what);
  return compile_checked_pattern("(.*\\.)?(" + key + ")", what);
}

// True if `pattern` (compiled by compile_pattern) matches the whole of `name`. Throws format_error if the
// name is longer than max_module_name_length.
inline bool pattern_matches(const std::regex& pattern, const std::string& name, const std::string& what) {
  if (name.size() > max_module_name_length)
    throw format_error(what + ": the module name " + quoted_excerpt(name) + " has " + std::to_string(name.size()) +
                       " characters; names matched against patterns are limited to " +
                       std::to_string(max_module_name_length));
  return std::regex_match(name, pattern);
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

inline std::string read_text_file(const std::string& path) {
  check_regular_file(path, path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error(path + ": cannot open the file");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) throw format_error(path + ": cannot read the file");
  return s.str();
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
    throw format_error(name + ": peft_type is " + json_excerpt(*p) + ", not \"" + expected + "\"");
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
    // PEFT finds no module for an empty list and refuses it; reading it as "no list" would select all.
    if (p->empty()) throw format_error(name + ": \"target_modules\" is an empty list");
    for (const auto& t : *p) {
      if (!t.is_string()) throw format_error(name + ": \"target_modules\" holds " + json_excerpt(t) + ", not a string");
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

// A config object as the text of adapter_config.json. Throws format_error if a string in it (a module
// name, a pattern) is not valid UTF-8.
inline std::string config_text(const nlohmann::ordered_json& j, const std::string& what) {
  try {
    return j.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw format_error(what + ": a name or pattern is not valid UTF-8 (" + e.what() + ")");
  }
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
  // Both files are written in full before either replaces its old version (see detail::write_partial).
  const std::string model = (dir / adapter_model_file).string(), config = (dir / adapter_config_file).string();
  const std::string model_partial =
      write_partial(model, "safetensors " + model, [&tensors](std::ostream& out) { tensors.write(out); });
  std::string config_partial;
  try {
    config_partial = write_partial(config, config, [&config_json](std::ostream& out) { out << config_json; });
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(model_partial, ec);
    throw;
  }
  commit_partial(model_partial, model, "safetensors " + model);
  commit_partial(config_partial, config, config);
}

}  // namespace detail
}  // namespace tensor_adapters::io
