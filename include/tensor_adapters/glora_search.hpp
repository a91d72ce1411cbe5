// Evolutionary search over GLoRA configurations of many layers at once, as the official code runs it.
//
// A candidate is one configuration per layer. The search keeps the top-k candidates seen so far and
// breeds each generation from them:
//   generation 0:  `population` distinct random candidates within the parameter budget;
//   generation g:  `mutations` mutants (a parent drawn from the top-k, each support tensor's choice in
//                  each layer redrawn with probability `mutation_probability`), then `crossovers`
//                  children (two parents drawn from the top-k, each choice taken from either with
//                  probability 1/2), then random candidates until the generation holds `population`;
//   after each generation the top-k are updated and the progress callback is called.
// Every candidate is evaluated once (candidates are unique over the whole search) and only if its
// parameter count (parameter_count(config, out, in) summed over layers, the official rule) is within
// the budget. Mutation and crossover give up after 10× their count of draws, as the official code does;
// random refill gives up after `max_random_draws` draws. If generation 0 finds no candidate within the
// budget by random draws, it starts from the cheapest candidate (each choice of least parameter count).
// All randomness comes from one generator seeded with `seed`: the same inputs and seed give the same
// result (and the same sequence of fitness calls).
//
// Example:
//   std::vector<tensor_adapters::glora_layer_shape> layers(12, {768, 768, 8});
//   tensor_adapters::glora_search_options options;
//   options.parameter_budget = 400000;
//   auto result = tensor_adapters::evolutionary_search(
//       layers, tensor_adapters::make_glora_space(std::vector<tensor_adapters::index>{8, 4}),
//       [&](const std::vector<tensor_adapters::glora_config>& configs) { return validation_accuracy(configs); },
//       options);
//   save(tensor_adapters::to_string(result.configs));
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "glora.hpp"

namespace tensor_adapters {

// A layer the search configures: its weight (out, in) and the store's maximum rank R.
struct glora_layer_shape {
  index out = 0;
  index in = 0;
  index max_rank = 0;
};

template <class T>
glora_layer_shape layer_shape(const glora<T>& a) {
  return {a.Ad.dimension(0), a.Au.dimension(1), a.Ad.dimension(1)};
}

// The official search's defaults.
struct glora_search_options {
  index population = 50;
  index top_k = 10;
  index generations = 20;
  index mutations = 25;
  double mutation_probability = 0.2;
  index crossovers = 25;
  index parameter_budget = std::numeric_limits<index>::max();  // summed over layers, official rule
  std::uint64_t seed = 0;
  index max_random_draws = 0;  // per random refill; 0 means 100 × population
};

// What the progress callback sees after each generation.
struct glora_search_progress {
  index generation = 0;                 // 0-based
  index evaluated = 0;                  // candidates evaluated in this generation
  index evaluations = 0;                // candidates evaluated so far
  double best_fitness = 0;              // the best so far
  index best_parameters = 0;
  std::vector<glora_config> best;       // one configuration per layer
  std::vector<double> top_k_fitness;    // the current top-k, best first
};

struct glora_search_result {
  std::vector<glora_config> configs;  // one per layer: the best candidate evaluated
  double fitness = 0;
  index parameters = 0;               // summed over layers, official rule
  index evaluations = 0;              // fitness calls made
};

namespace detail {

class glora_searcher {
 public:
  struct candidate {
    std::vector<std::uint16_t> genes;  // per layer, per support tensor A..E: an index into the space's list
    double fitness;
    index parameters;
  };

  glora_searcher(const std::vector<glora_layer_shape>& layers, const glora_space& space,
                 const glora_search_options& options)
      : layers_(layers), space_(space), options_(options), gen_(options.seed) {
    const char* fn = "evolutionary_search";
    TA_CHECK(!layers.empty(), fn, "there are no layers to configure");
    TA_CHECK(options.population >= 1 && options.top_k >= 1 && options.generations >= 1 && options.mutations >= 0 &&
                 options.crossovers >= 0 && options.max_random_draws >= 0,
             fn,
             "population " + std::to_string(options.population) + ", top-k " + std::to_string(options.top_k) +
                 " and generations " + std::to_string(options.generations) + " must be at least 1, mutations " +
                 std::to_string(options.mutations) + ", crossovers " + std::to_string(options.crossovers) +
                 " and max_random_draws " + std::to_string(options.max_random_draws) + " at least 0");
    constexpr index most = std::numeric_limits<index>::max() / 100;  // (the search draws up to 100 × population)
    TA_CHECK(options.population <= most && options.mutations <= most && options.crossovers <= most, fn,
             "population " + std::to_string(options.population) + ", mutations " +
                 std::to_string(options.mutations) + " and crossovers " + std::to_string(options.crossovers) +
                 " must be at most " + std::to_string(most));
    TA_CHECK(options.mutation_probability >= 0.0 && options.mutation_probability <= 1.0, fn,
             "mutation probability " + std::to_string(options.mutation_probability) + " must be in [0, 1]");
    index max_rank_needed = 0;
    for (const auto* list : lists())
      for (const auto& c : *list)
        if (c.kind == glora_kind::lora) max_rank_needed = std::max(max_rank_needed, c.rank);
    check_glora_space(space, 0, fn);
    for (const auto* list : lists())
      TA_CHECK(list->size() <= 65535, fn, "the search space lists more than 65535 choices for a support tensor");
    cost_.resize(layers.size() * 5);
    index cheapest = 0, most_parameters = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const glora_layer_shape& s = layers[l];
      TA_CHECK(s.out >= 1 && s.in >= 1 && s.max_rank >= 1, fn,
               "layer " + std::to_string(l) + " (out " + std::to_string(s.out) + ", in " + std::to_string(s.in) +
                   ", maximum rank " + std::to_string(s.max_rank) + ") must have sizes of at least 1");
      TA_CHECK(s.max_rank <= std::min(s.out, s.in), fn,
               "layer " + std::to_string(l) + " (" + std::to_string(s.out) + ", " + std::to_string(s.in) +
                   ") has maximum rank R = " + std::to_string(s.max_rank) + ", above min(out, in)");
      TA_CHECK(s.out <= glora_max_extent && s.in <= glora_max_extent, fn,
               "layer " + std::to_string(l) + " (" + std::to_string(s.out) + ", " + std::to_string(s.in) +
                   ") has a parameter count beyond an index");
      TA_CHECK(max_rank_needed <= s.max_rank, fn,
               "the search space has lora rank " + std::to_string(max_rank_needed) + " but layer " +
                   std::to_string(l) + " (" + std::to_string(s.out) + ", " + std::to_string(s.in) +
                   ") has maximum rank R = " + std::to_string(s.max_rank));
      int t = 0;
      for (const auto* list : lists()) {
        const index rows = t == 2 ? s.in : s.out;
        const index cols = t == 2 ? 1 : t < 2 ? s.in : 1;
        std::vector<index>& c = cost_[l * 5 + std::size_t(t)];
        for (const auto& choice : *list) c.push_back(glora_choice_parameters(choice, rows, cols));
        cheapest += *std::min_element(c.begin(), c.end());
        // Every candidate's count, a sum of one entry per list and layer, must fit an index.
        const index dearest = *std::max_element(c.begin(), c.end());
        TA_CHECK(dearest <= std::numeric_limits<index>::max() - most_parameters, fn,
                 "the layers' parameter counts add up beyond an index (at layer " + std::to_string(l) + ")");
        most_parameters += dearest;
        ++t;
      }
    }
    TA_CHECK(cheapest <= options.parameter_budget, fn,
             "no configuration meets the parameter budget " + std::to_string(options.parameter_budget) +
                 ": the cheapest set of configurations in this space needs " + std::to_string(cheapest));
  }

  template <class Fitness, class Progress>
  glora_search_result run(Fitness& fitness, Progress& progress) {
    std::vector<candidate> top;
    for (index g = 0; g < options_.generations; ++g) {
      std::vector<candidate> population;
      if (g == 0) {
        refill(population, fitness);
        if (population.empty()) try_add(cheapest_genes(), population, fitness);
      } else {
        breed(top, population, fitness);
        refill(population, fitness);
      }
      const index evaluated = static_cast<index>(population.size());
      top.insert(top.end(), population.begin(), population.end());
      std::stable_sort(top.begin(), top.end(),
                       [](const candidate& a, const candidate& b) { return a.fitness > b.fitness; });
      if (static_cast<index>(top.size()) > options_.top_k) top.resize(static_cast<std::size_t>(options_.top_k));
      glora_search_progress p;
      p.generation = g;
      p.evaluated = evaluated;
      p.evaluations = evaluations_;
      p.best_fitness = top.front().fitness;
      p.best_parameters = top.front().parameters;
      p.best = decode(top.front().genes);
      for (const auto& c : top) p.top_k_fitness.push_back(c.fitness);
      progress(p);
    }
    glora_search_result r;
    r.configs = decode(top.front().genes);
    r.fitness = top.front().fitness;
    r.parameters = top.front().parameters;
    r.evaluations = evaluations_;
    return r;
  }

 private:
  std::vector<const std::vector<glora_choice>*> lists() const {
    return {&space_.A, &space_.B, &space_.C, &space_.D, &space_.E};
  }

  std::vector<glora_config> decode(const std::vector<std::uint16_t>& genes) const {
    const auto ls = lists();
    std::vector<glora_config> configs(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      glora_choice* slots[5] = {&configs[l].A, &configs[l].B, &configs[l].C, &configs[l].D, &configs[l].E};
      for (std::size_t t = 0; t < 5; ++t) *slots[t] = (*ls[t])[genes[l * 5 + t]];
    }
    return configs;
  }

  index parameters(const std::vector<std::uint16_t>& genes) const {
    index p = 0;
    for (std::size_t k = 0; k < genes.size(); ++k) p += cost_[k][genes[k]];
    return p;
  }

  std::uint16_t random_gene(std::size_t k) {
    return static_cast<std::uint16_t>(glora_uniform_index(cost_[k].size(), gen_));
  }

  std::vector<std::uint16_t> cheapest_genes() const {
    std::vector<std::uint16_t> genes(cost_.size());
    for (std::size_t k = 0; k < cost_.size(); ++k)
      genes[k] = static_cast<std::uint16_t>(std::min_element(cost_[k].begin(), cost_[k].end()) - cost_[k].begin());
    return genes;
  }

  // Evaluates and keeps the candidate if it is new and within the budget.
  template <class Fitness>
  bool try_add(std::vector<std::uint16_t> genes, std::vector<candidate>& out, Fitness& fitness) {
    if (seen_.count(genes) != 0) return false;
    const index p = parameters(genes);
    if (p > options_.parameter_budget) return false;
    const std::vector<glora_config> configs = decode(genes);
    const double f = static_cast<double>(fitness(static_cast<const std::vector<glora_config>&>(configs)));
    TA_CHECK(!std::isnan(f), "evolutionary_search", "the fitness of " + to_string(configs) + " is NaN");
    ++evaluations_;
    seen_.emplace(genes, f);
    out.push_back({std::move(genes), f, p});
    return true;
  }

  template <class Fitness>
  void refill(std::vector<candidate>& population, Fitness& fitness) {
    const index max_draws = options_.max_random_draws > 0 ? options_.max_random_draws : 100 * options_.population;
    for (index d = 0; d < max_draws && static_cast<index>(population.size()) < options_.population; ++d) {
      std::vector<std::uint16_t> genes(cost_.size());
      for (std::size_t k = 0; k < genes.size(); ++k) genes[k] = random_gene(k);
      try_add(std::move(genes), population, fitness);
    }
  }

  template <class Fitness>
  void breed(const std::vector<candidate>& top, std::vector<candidate>& population, Fitness& fitness) {
    index made = 0;
    for (index d = 0; d < 10 * options_.mutations && made < options_.mutations; ++d) {
      std::vector<std::uint16_t> genes = top[glora_uniform_index(top.size(), gen_)].genes;
      for (std::size_t k = 0; k < genes.size(); ++k)
        if (uniform01(gen_) < options_.mutation_probability) genes[k] = random_gene(k);
      made += try_add(std::move(genes), population, fitness) ? 1 : 0;
    }
    made = 0;
    for (index d = 0; d < 10 * options_.crossovers && made < options_.crossovers; ++d) {
      const candidate& p1 = top[glora_uniform_index(top.size(), gen_)];
      const candidate& p2 = top[glora_uniform_index(top.size(), gen_)];
      std::vector<std::uint16_t> genes(p1.genes.size());
      for (std::size_t k = 0; k < genes.size(); ++k) genes[k] = uniform01(gen_) < 0.5 ? p1.genes[k] : p2.genes[k];
      made += try_add(std::move(genes), population, fitness) ? 1 : 0;
    }
  }

  const std::vector<glora_layer_shape>& layers_;
  const glora_space& space_;
  glora_search_options options_;
  std::mt19937_64 gen_;
  std::vector<std::vector<index>> cost_;  // per (layer, support tensor): the parameter count of each choice
  std::map<std::vector<std::uint16_t>, double> seen_;
  index evaluations_ = 0;
};

}  // namespace detail

// The best configuration set found for `layers` in `space` by the official evolutionary search.
//   fitness:  double(const std::vector<glora_config>&), one configuration per layer; higher is better.
//   progress: void(const glora_search_progress&), called after every generation.
// Throws argument_error, before any fitness call, if there are no layers, a layer is empty or its R is
// above min(out, in), the space is not valid (an empty list, a repeated choice, an illegal kind such as
// scalar for C) or holds a lora rank above some layer's maximum rank R, the options are out of range
// (population, mutations and crossovers at most max(index) / 100), a parameter count (a layer of more
// than 2^30 rows or columns, or the layers' counts added up) does not fit an index, or no configuration
// set meets the parameter budget; and during the search if the fitness returns NaN.
template <class Fitness, class Progress>
glora_search_result evolutionary_search(const std::vector<glora_layer_shape>& layers, const glora_space& space,
                                        Fitness&& fitness, const glora_search_options& options, Progress&& progress) {
  detail::glora_searcher searcher(layers, space, options);
  return searcher.run(fitness, progress);
}

template <class Fitness>
glora_search_result evolutionary_search(const std::vector<glora_layer_shape>& layers, const glora_space& space,
                                        Fitness&& fitness, const glora_search_options& options = {}) {
  auto ignore = [](const glora_search_progress&) {};
  return evolutionary_search(layers, space, fitness, options, ignore);
}

// The parameter count of one configuration per layer, summed (official rule). Throws argument_error if
// the counts of configurations and layers differ, a layer is empty or its R is outside [1, min(out,
// in)], a configuration is illegal or above its layer's R, or the count does not fit an index.
inline index parameter_count(const std::vector<glora_config>& configs, const std::vector<glora_layer_shape>& layers) {
  const char* fn = "glora parameter_count";
  TA_CHECK(configs.size() == layers.size(), fn,
           std::to_string(configs.size()) + " configurations for " + std::to_string(layers.size()) + " layers");
  index p = 0;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const glora_layer_shape& s = layers[l];
    TA_CHECK(s.out >= 1 && s.in >= 1 && s.max_rank >= 1 && s.max_rank <= std::min(s.out, s.in), fn,
             "layer " + std::to_string(l) + " (out " + std::to_string(s.out) + ", in " + std::to_string(s.in) +
                 ", maximum rank " + std::to_string(s.max_rank) + ") needs sizes of at least 1 and R ≤ min(out, in)");
    detail::check_glora_config(configs[l], layers[l].max_rank, fn);
    const index count = parameter_count(configs[l], layers[l].out, layers[l].in);
    TA_CHECK(count <= std::numeric_limits<index>::max() - p, fn,
             "the layers' parameter counts add up beyond an index (at layer " + std::to_string(l) + ")");
    p += count;
  }
  return p;
}

}  // namespace tensor_adapters
